//! Advisory locks (POSIX `fcntl` record locks and `flock`) held across nodes.
//!
//! Two levels: an exact byte-range table per inode for the lock owners on this node,
//! and one cluster lock per inode (`posix:{ino}`) that this node's session holds shared
//! while any local owner holds a read lock, and exclusive while any holds a write lock.
//! So conflicts between owners on one node are exact, and conflicts across nodes are
//! whole-file (a conservative superset: never two conflicting grants, sometimes a
//! refusal that a single-node filesystem would grant). Advisory locks are never broken:
//! a node waits (F_SETLKW polls) or fails with `WouldBlock` (F_SETLK).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{Consistency, MetaClient, MetaClientError, VolumeError, VolumeResult, lock};
use crate::meta::{Ino, LockMode, MetaError, SessionId};

/// The kind of an advisory lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdvisoryKind {
    Read,
    Write,
}

/// A held lock over bytes `[start, end]` (inclusive, like FUSE's `fuse_file_lock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdvisoryLock {
    pub start: u64,
    pub end: u64,
    pub kind: AdvisoryKind,
    /// The holder's pid (0 when the holder is on another node).
    pub pid: u32,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    owner: u64,
    lock: AdvisoryLock,
}

#[derive(Debug, Default)]
struct InoLocks {
    entries: Vec<Entry>,
    cluster: Option<(LockMode, SessionId)>,
}

impl InoLocks {
    fn conflict(
        &self,
        owner: u64,
        start: u64,
        end: u64,
        kind: AdvisoryKind,
    ) -> Option<AdvisoryLock> {
        self.entries
            .iter()
            .find(|e| {
                e.owner != owner
                    && e.lock.start <= end
                    && start <= e.lock.end
                    && (kind == AdvisoryKind::Write || e.lock.kind == AdvisoryKind::Write)
            })
            .map(|e| e.lock)
    }

    /// Removes `owner`'s coverage of `[start, end]`, splitting its locks.
    fn clear(&mut self, owner: u64, start: u64, end: u64) {
        let mut out = Vec::with_capacity(self.entries.len());
        for e in self.entries.drain(..) {
            if e.owner != owner || e.lock.end < start || e.lock.start > end {
                out.push(e);
                continue;
            }
            if e.lock.start < start {
                out.push(Entry {
                    lock: AdvisoryLock {
                        end: start - 1,
                        ..e.lock
                    },
                    ..e
                });
            }
            if e.lock.end > end {
                out.push(Entry {
                    lock: AdvisoryLock {
                        start: end + 1,
                        ..e.lock
                    },
                    ..e
                });
            }
        }
        self.entries = out;
    }

    /// The cluster mode the local locks need.
    fn needed(&self) -> Option<LockMode> {
        if self
            .entries
            .iter()
            .any(|e| e.lock.kind == AdvisoryKind::Write)
        {
            Some(LockMode::Exclusive)
        } else if self.entries.is_empty() {
            None
        } else {
            Some(LockMode::Shared)
        }
    }
}

fn key(ino: Ino) -> String {
    format!("posix:{ino}")
}

/// This node's advisory locks.
#[derive(Debug, Default)]
pub struct Table {
    inodes: Mutex<HashMap<Ino, InoLocks>>,
    /// Serializes lock changes (they are rare; this keeps local and cluster state in step).
    serial: tokio::sync::Mutex<()>,
}

impl Table {
    pub(crate) async fn getlk(
        &self,
        meta: &dyn MetaClient,
        ino: Ino,
        owner: u64,
        start: u64,
        end: u64,
        kind: AdvisoryKind,
    ) -> VolumeResult<Option<AdvisoryLock>> {
        if let Some(l) = lock(&self.inodes)
            .get(&ino)
            .and_then(|i| i.conflict(owner, start, end, kind))
        {
            return Ok(Some(l));
        }
        let session = meta.session();
        let info = meta.lock_info(&key(ino), Consistency::Linearizable).await?;
        let other = info.and_then(|i| {
            i.holders
                .into_iter()
                .filter(|h| Some(h.session) != session)
                .find(|h| kind == AdvisoryKind::Write || h.mode == LockMode::Exclusive)
        });
        Ok(other.map(|h| AdvisoryLock {
            start: 0,
            end: u64::MAX,
            kind: if h.mode == LockMode::Exclusive {
                AdvisoryKind::Write
            } else {
                AdvisoryKind::Read
            },
            pid: 0,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn setlk(
        &self,
        meta: &dyn MetaClient,
        ino: Ino,
        owner: u64,
        start: u64,
        end: u64,
        kind: Option<AdvisoryKind>,
        pid: u32,
        wait: bool,
    ) -> VolumeResult<()> {
        if start > end {
            return Err(VolumeError::Invalid(
                "lock range ends before it starts".into(),
            ));
        }
        loop {
            let serial = self.serial.lock().await;
            let Some(kind) = kind else {
                let (need, held) = {
                    let mut map = lock(&self.inodes);
                    let Some(i) = map.get_mut(&ino) else {
                        return Ok(());
                    };
                    i.clear(owner, start, end);
                    (i.needed(), i.cluster)
                };
                return self.sync_cluster(meta, ino, need, held).await;
            };
            let (conflict, held) = {
                let map = lock(&self.inodes);
                let i = map.get(&ino);
                (
                    i.and_then(|i| i.conflict(owner, start, end, kind)),
                    i.and_then(|i| i.cluster),
                )
            };
            let want = match kind {
                AdvisoryKind::Write => LockMode::Exclusive,
                AdvisoryKind::Read => LockMode::Shared,
            };
            let busy = if conflict.is_some() {
                true
            } else {
                let covered = held.is_some_and(|(m, s)| {
                    Some(s) == meta.session()
                        && (m == LockMode::Exclusive || want == LockMode::Shared)
                });
                if covered {
                    false
                } else {
                    match meta.acquire(&key(ino), want).await {
                        Ok((_, session)) => {
                            lock(&self.inodes).entry(ino).or_default().cluster =
                                Some((want, session));
                            false
                        }
                        Err(MetaClientError::Meta(MetaError::LockBusy { .. })) => true,
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            if !busy {
                let mut map = lock(&self.inodes);
                let i = map.entry(ino).or_default();
                i.clear(owner, start, end);
                i.entries.push(Entry {
                    owner,
                    lock: AdvisoryLock {
                        start,
                        end,
                        kind,
                        pid,
                    },
                });
                return Ok(());
            }
            if !wait {
                return Err(VolumeError::WouldBlock);
            }
            drop(serial);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Brings the cluster lock in line with what the local locks need.
    async fn sync_cluster(
        &self,
        meta: &dyn MetaClient,
        ino: Ino,
        need: Option<LockMode>,
        held: Option<(LockMode, SessionId)>,
    ) -> VolumeResult<()> {
        let Some((mode, session)) = held else {
            return Ok(());
        };
        if need == Some(mode) {
            return Ok(());
        }
        // Release, then (for a downgrade) take it shared again.
        meta.release(session, &key(ino)).await?;
        let mut now_held = None;
        if need == Some(LockMode::Shared)
            && let Ok((_, s)) = meta.acquire(&key(ino), LockMode::Shared).await
        {
            now_held = Some((LockMode::Shared, s));
        }
        let mut map = lock(&self.inodes);
        if let Some(i) = map.get_mut(&ino) {
            i.cluster = now_held;
            if i.entries.is_empty() && i.cluster.is_none() {
                map.remove(&ino);
            }
        }
        Ok(())
    }

    /// Drops every cluster-level advisory lock (shutdown).
    pub(crate) async fn release_all(&self, meta: &dyn MetaClient) {
        let held: Vec<(Ino, SessionId)> = lock(&self.inodes)
            .drain()
            .filter_map(|(ino, i)| i.cluster.map(|(_, s)| (ino, s)))
            .collect();
        for (ino, s) in held {
            let _ = meta.release(s, &key(ino)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(start: u64, end: u64, kind: AdvisoryKind) -> AdvisoryLock {
        AdvisoryLock {
            start,
            end,
            kind,
            pid: 1,
        }
    }

    #[test]
    fn owners_conflict_only_on_overlapping_writes_and_clear_splits() {
        let mut i = InoLocks::default();
        i.entries.push(Entry {
            owner: 1,
            lock: l(0, 99, AdvisoryKind::Write),
        });
        assert!(i.conflict(2, 50, 60, AdvisoryKind::Read).is_some());
        assert!(i.conflict(2, 100, 200, AdvisoryKind::Write).is_none());
        assert!(i.conflict(1, 0, 10, AdvisoryKind::Write).is_none());
        i.clear(1, 10, 19);
        let ranges: Vec<_> = i
            .entries
            .iter()
            .map(|e| (e.lock.start, e.lock.end))
            .collect();
        assert_eq!(ranges, vec![(0, 9), (20, 99)]);
        assert_eq!(i.needed(), Some(LockMode::Exclusive));
        i.clear(1, 0, u64::MAX);
        assert_eq!(i.needed(), None);
    }
}
