//! The state machine store: the in-memory state `S`, what was applied, and snapshots in
//! `raft-sm.redb`.
//!
//! Invariants:
//! - `S`, `last_applied` and `last_membership` always describe the same log prefix; the
//!   applied watch is advanced only after `S` holds that prefix;
//! - the stored snapshot's data encodes exactly its metadata's `last_log_id` and membership
//!   (checked when a snapshot is installed or loaded);
//! - a snapshot is fsync'd before `build_snapshot`/`install_snapshot` return, and a built
//!   snapshot never replaces a newer stored one.
//!
//! Snapshot data format: one version byte, then postcard of
//! `(last_applied, last_membership, S)`; nothing may follow.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use csv_core::volume::Applied;
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder,
    StorageError, StoredMembership,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::{Nid, SM_FILE, StateMachineData, StoreError, blocking, decode, encode, init_format};
use crate::types::{RaftNode, Response, TypeConfig};

const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
const META_KEY: &str = "meta";
const DATA_KEY: &str = "data";
const SEQ_KEY: &str = "seq";

/// Version byte at the start of snapshot data.
const SNAPSHOT_VERSION: u8 = 1;

type Membership = StoredMembership<Nid, RaftNode>;
type Meta = SnapshotMeta<Nid, RaftNode>;

#[derive(Serialize)]
struct BodyRef<'a, S> {
    last_applied: &'a Option<LogId<Nid>>,
    last_membership: &'a Membership,
    data: &'a S,
}

/// The decoded content of a snapshot.
#[derive(Debug, Deserialize)]
pub(super) struct SnapshotBody<S> {
    pub last_applied: Option<LogId<Nid>>,
    pub last_membership: Membership,
    pub data: S,
}

pub(super) fn encode_snapshot<S: Serialize>(
    last_applied: &Option<LogId<Nid>>,
    last_membership: &Membership,
    data: &S,
) -> Result<Vec<u8>, StoreError> {
    let body = BodyRef {
        last_applied,
        last_membership,
        data,
    };
    postcard::to_extend(&body, vec![SNAPSHOT_VERSION]).map_err(|source| StoreError::Encode {
        what: "a snapshot",
        source,
    })
}

/// Decodes snapshot data (bytes that may come from another node).
pub(super) fn decode_snapshot<S: StateMachineData>(
    bytes: &[u8],
) -> Result<SnapshotBody<S>, StoreError> {
    match bytes.split_first() {
        Some((&SNAPSHOT_VERSION, rest)) => {
            let (body, tail) =
                postcard::take_from_bytes(rest).map_err(|source| StoreError::Decode {
                    what: "a snapshot",
                    source,
                })?;
            if tail.is_empty() {
                Ok(body)
            } else {
                Err(StoreError::BadSnapshot(
                    "bytes after the end of the snapshot",
                ))
            }
        }
        Some(_) => Err(StoreError::BadSnapshot("unknown snapshot version")),
        None => Err(StoreError::BadSnapshot("empty snapshot")),
    }
}

/// Checks that decoded snapshot data says what its metadata says.
fn check_matches<S>(body: &SnapshotBody<S>, meta: &Meta) -> Result<(), StoreError> {
    if body.last_applied != meta.last_log_id || body.last_membership != meta.last_membership {
        return Err(StoreError::SnapshotMismatch {
            data: body.last_applied,
            meta: meta.last_log_id,
        });
    }
    Ok(())
}

fn read_snapshot(db: &Database) -> Result<Option<(Meta, Vec<u8>)>, StoreError> {
    let tx = db.begin_read()?;
    let t = tx.open_table(SNAPSHOT)?;
    let Some(meta) = t.get(META_KEY)? else {
        return Ok(None);
    };
    let meta: Meta = decode("the snapshot metadata", meta.value())?;
    let data = t
        .get(DATA_KEY)?
        .map(|v| v.value().to_vec())
        .ok_or(StoreError::BadSnapshot("snapshot metadata without data"))?;
    Ok(Some((meta, data)))
}

/// Stores `meta` + `data` (installed from the leader) as the current snapshot, fsync'd.
fn write_snapshot(db: &Database, meta: &Meta, data: &[u8]) -> Result<(), StoreError> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    {
        let mut t = tx.open_table(SNAPSHOT)?;
        t.insert(META_KEY, encode("the snapshot metadata", meta)?.as_slice())?;
        t.insert(DATA_KEY, data)?;
    }
    tx.commit()?;
    Ok(())
}

/// Stores a locally built snapshot, fsync'd, under a fresh id, unless the stored snapshot is
/// newer (an `install_snapshot` won the race); returns the built snapshot's metadata.
fn store_built(
    db: &Database,
    last_applied: Option<LogId<Nid>>,
    last_membership: Membership,
    data: &[u8],
) -> Result<Meta, StoreError> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    let meta = {
        let mut t = tx.open_table(SNAPSHOT)?;
        let seq = match t.get(SEQ_KEY)? {
            Some(v) => decode::<u64>("the snapshot sequence", v.value())? + 1,
            None => 1,
        };
        let stored = match t.get(META_KEY)? {
            Some(v) => Some(decode::<Meta>("the snapshot metadata", v.value())?),
            None => None,
        };
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let meta = Meta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        t.insert(SEQ_KEY, encode("the snapshot sequence", &seq)?.as_slice())?;
        if stored.is_none_or(|s| s.last_log_id <= meta.last_log_id) {
            t.insert(META_KEY, encode("the snapshot metadata", &meta)?.as_slice())?;
            t.insert(DATA_KEY, data)?;
        }
        meta
    };
    tx.commit()?;
    Ok(meta)
}

/// The state machine side of the Raft store, generic over the metadata state `S`.
///
/// Take [`state`](Self::state) and [`applied`](Self::applied) before handing the store to
/// `Raft::new`: they stay valid while Raft owns the store.
pub struct StateMachineStore<S> {
    db: Arc<Database>,
    state: Arc<RwLock<S>>,
    last_applied: Option<LogId<Nid>>,
    last_membership: Membership,
    applied_tx: watch::Sender<Option<LogId<Nid>>>,
    /// The change feed: every applied command with its response, sent after the state
    /// holds it (see [`Self::feed`]).
    feed_tx: broadcast::Sender<Applied>,
}

/// Capacity of the change feed; a slower subscriber sees `Lagged` and must rescan.
const FEED_CAPACITY: usize = 4096;

impl<S> std::fmt::Debug for StateMachineStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("last_applied", &self.last_applied)
            .field("last_membership", &self.last_membership)
            .finish_non_exhaustive()
    }
}

impl<S: StateMachineData> StateMachineStore<S> {
    /// Opens the snapshot file and loads the newest snapshot (blocking).
    pub(super) fn open(db: Arc<Database>) -> Result<Self, StoreError> {
        init_format(&db, SNAPSHOT, SM_FILE)?;
        let (state, last_applied, last_membership) = match read_snapshot(&db)? {
            Some((meta, data)) => {
                let body = decode_snapshot::<S>(&data)?;
                check_matches(&body, &meta)?;
                (body.data, body.last_applied, body.last_membership)
            }
            None => (S::default(), None, Membership::default()),
        };
        let (applied_tx, _) = watch::channel(last_applied);
        Ok(StateMachineStore {
            db,
            state: Arc::new(RwLock::new(state)),
            last_applied,
            last_membership,
            applied_tx,
            feed_tx: broadcast::channel(FEED_CAPACITY).0,
        })
    }
}

impl<S> StateMachineStore<S> {
    /// The state, for queries. Readers must hold the lock only briefly: `apply` takes it for
    /// writing once per batch of entries.
    pub fn state(&self) -> Arc<RwLock<S>> {
        self.state.clone()
    }

    /// The id of the last applied entry; it changes after `state()` includes that entry.
    pub fn applied(&self) -> watch::Receiver<Option<LogId<Nid>>> {
        self.applied_tx.subscribe()
    }

    /// The change feed: each applied normal entry's command and response, published in
    /// log order after the state includes it. Entries applied by installing a snapshot
    /// are not published (subscribers must not rely on seeing every command; they get
    /// `Lagged` when they fall behind and rescan then).
    pub fn feed(&self) -> broadcast::Sender<Applied> {
        self.feed_tx.clone()
    }

    /// The id of the last applied entry now.
    pub fn last_applied(&self) -> Option<LogId<Nid>> {
        self.last_applied
    }
}

fn sm_err(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError<Nid> {
    move |e| e.into_raft(ErrorSubject::StateMachine, verb)
}

impl<S: StateMachineData> RaftStateMachine<TypeConfig> for StateMachineStore<S> {
    type SnapshotBuilder = SnapshotBuilder<S>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<Nid>>, Membership), StorageError<Nid>> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<Nid>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries = entries.into_iter();
        let mut out = Vec::with_capacity(entries.size_hint().0);
        let publish = self.feed_tx.receiver_count() > 0;
        let mut published = Vec::new();
        {
            let mut state = self
                .state
                .write()
                .map_err(|_| sm_err(ErrorVerb::Write)(StoreError::Poisoned))?;
            for entry in entries {
                self.last_applied = Some(entry.log_id);
                out.push(match entry.payload {
                    EntryPayload::Blank => Response::default(),
                    EntryPayload::Normal(cmd) => {
                        let r = state.apply(&cmd);
                        if publish {
                            published.push(Applied {
                                op: cmd.op,
                                response: r.clone(),
                            });
                        }
                        r
                    }
                    EntryPayload::Membership(m) => {
                        self.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        Response::default()
                    }
                });
            }
        }
        self.applied_tx.send_replace(self.last_applied);
        for a in published {
            let _ = self.feed_tx.send(a);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Runs on the state machine task, serialized with `apply`: this copy is point-in-time.
        // A poisoned lock still holds the state of the last complete batch.
        let data = match self.state.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        SnapshotBuilder {
            db: self.db.clone(),
            data: Arc::new(data),
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<Nid>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<Nid>> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let db = self.db.clone();
        let meta = meta.clone();
        let bytes = snapshot.into_inner();
        let body = blocking(move || {
            let body = decode_snapshot::<S>(&bytes)?;
            check_matches(&body, &meta)?;
            write_snapshot(&db, &meta, &bytes)?;
            Ok(body)
        })
        .await
        .map_err(|e| e.into_raft(subject, ErrorVerb::Write))?;
        {
            let mut state = match self.state.write() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            *state = body.data;
        }
        self.state.clear_poison();
        self.last_applied = body.last_applied;
        self.last_membership = body.last_membership;
        self.applied_tx.send_replace(self.last_applied);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<Nid>> {
        let db = self.db.clone();
        let stored = blocking(move || read_snapshot(&db))
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Snapshot(None), ErrorVerb::Read))?;
        Ok(stored.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// A point-in-time copy of the state machine, turned into a durable snapshot.
pub struct SnapshotBuilder<S> {
    db: Arc<Database>,
    data: Arc<S>,
    last_applied: Option<LogId<Nid>>,
    last_membership: Membership,
}

impl<S> std::fmt::Debug for SnapshotBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotBuilder")
            .field("last_applied", &self.last_applied)
            .finish_non_exhaustive()
    }
}

impl<S: StateMachineData> RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<Nid>> {
        let db = self.db.clone();
        let data = self.data.clone();
        let last_applied = self.last_applied;
        let last_membership = self.last_membership.clone();
        let (meta, bytes) = blocking(move || {
            let bytes = encode_snapshot(&last_applied, &last_membership, &*data)?;
            let meta = store_built(&db, last_applied, last_membership, &bytes)?;
            Ok((meta, bytes))
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Snapshot(None), ErrorVerb::Write))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}
