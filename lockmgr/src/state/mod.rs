//! The metadata state machine of a volume: namespace, extent maps, block allocation,
//! sessions, locks and nodes, as plain deterministic logic.
//!
//! [`VolumeState::apply`] takes one [`Command`] and returns one [`Response`]. It never
//! reads a clock, never does I/O and never draws random numbers: its only time is the
//! commands' `now_ms` (kept as a running maximum), so every replica that applies the
//! same log reaches the same state. Every map is a `BTreeMap`, so serialising the state
//! (postcard or JSON, for snapshots) is deterministic too. A refused command leaves the
//! state unchanged except for the clock: each operation validates before it mutates.
//!
//! Data layout:
//! - `inodes: Ino -> Inode`; a directory's entries live in its inode
//!   (`entries: name -> Ino`, sorted by name) together with its parent (`parent`, the
//!   root is its own parent), so lookup and readdir are `BTreeMap` queries. Files keep
//!   their extent map (`file_block -> Extent`), symlinks their target.
//! - `free`: the free pool as disjoint, coalesced LUN ranges (`start -> len`).
//! - `sessions: SessionId -> Session`: the lease and its reserved ranges (same shape).
//! - `locks: key -> holders`, with the last fencing token handed out in `last_token`.
//! - `nodes: NodeId -> NodeRecord`.
//!
//! Invariants (checked by [`VolumeState::check_invariants`], the fsck):
//! - every LUN block in `[data_start_block, total_blocks)` is in exactly one of the free
//!   pool, one session's reservation, or one file extent; nothing outside that range is;
//! - extents of a file never overlap in file space; `Attr::blocks` is their total length;
//! - a non-directory's `nlink` is the number of entries naming it; a directory's is
//!   `2 + subdirectories`; every entry names an existing inode, and every inode but the
//!   root is reachable from the root (no orphans, no directory cycles);
//! - locks are held only by live sessions; an exclusive holder is alone; every token is
//!   at most `last_token`; a node has at most one session.

mod alloc;
mod data;
mod fsck;
mod locks;
mod namespace;
mod sessions;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use csv_core::meta::{
    Attr, BlockRange, DirEntry, Extent, FencingToken, FileKind, Ino, LockHolder, LockInfo,
    MetaError, NodeId, NodeRecord, SessionId, SessionInfo, SpaceInfo, Timestamp, VolumeInfo,
};
use serde::{Deserialize, Serialize};

use crate::types::{Command, Op, Response};
use alloc::{ExtentMap, RangeSet};

/// The most hard links an inode may have (ext4's `EXT4_LINK_MAX`); also the most
/// subdirectories a directory may hold plus two.
pub const MAX_LINKS: u32 = 65_000;

/// One inode: its attributes and whatever its kind needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Inode {
    attr: Attr,
    /// Directories: the directory holding this one (the root: itself). Others: 0.
    parent: Ino,
    /// Directories: entries by name.
    entries: BTreeMap<String, Ino>,
    /// Regular files: the extent map.
    extents: ExtentMap,
    /// Symlinks: the target.
    symlink: Option<String>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

impl Inode {
    fn is_dir(&self) -> bool {
        self.attr.kind == FileKind::Dir
    }
}

/// A live session and the blocks reserved to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Session {
    info: SessionInfo,
    reserved: RangeSet,
}

/// A lock with at least one holder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Lock {
    /// Sorted by session id; an exclusive holder is alone.
    holders: Vec<LockHolder>,
    break_requested_by: Option<NodeId>,
}

/// The whole replicated metadata of one volume. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeState {
    now_ms: u64,
    volume: Option<VolumeInfo>,
    inodes: BTreeMap<Ino, Inode>,
    next_ino: Ino,
    free: RangeSet,
    sessions: BTreeMap<SessionId, Session>,
    next_session: SessionId,
    locks: BTreeMap<String, Lock>,
    last_token: FencingToken,
    nodes: BTreeMap<NodeId, NodeRecord>,
    /// Responses of recent writes per submitting node process, for exactly-once retries
    /// (see `types::Origin`): node -> (incarnation, serial -> response).
    dedup: BTreeMap<NodeId, (u64, BTreeMap<u64, Response>)>,
}

/// Most remembered responses per node process (a node has far fewer writes in flight).
const DEDUP_WINDOW: usize = 4096;

type OpResult = Result<Response, MetaError>;

impl VolumeState {
    /// An empty state (no volume yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one command; refusals are `Response::Err` and leave the state unchanged
    /// (apart from the clock).
    pub fn apply(&mut self, cmd: &Command) -> Response {
        self.now_ms = self.now_ms.max(cmd.now_ms);
        if let Some(o) = &cmd.origin
            && let Some((inc, seen)) = self.dedup.get(&o.node)
            && *inc == o.incarnation
            && let Some(r) = seen.get(&o.serial)
        {
            return r.clone();
        }
        let response = match self.apply_op(&cmd.op) {
            Ok(r) => r,
            Err(e) => Response::Err(e),
        };
        if let Some(o) = &cmd.origin {
            let entry = self
                .dedup
                .entry(o.node)
                .or_insert_with(|| (o.incarnation, BTreeMap::new()));
            if entry.0 != o.incarnation {
                // A new process of that node: the old one's retries can no longer come.
                *entry = (o.incarnation, BTreeMap::new());
            }
            entry.1 = entry.1.split_off(&o.answered_below);
            entry.1.insert(o.serial, response.clone());
            while entry.1.len() > DEDUP_WINDOW {
                entry.1.pop_first();
            }
        }
        response
    }

    fn apply_op(&mut self, op: &Op) -> OpResult {
        match op {
            Op::InitVolume { info } => self.init_volume(info),
            Op::RegisterNode {
                node,
                rpc_addr,
                nbd_addr,
                mount,
            } => self.register_node(*node, rpc_addr, nbd_addr, mount),
            Op::RemoveNode { node } => self.remove_node(*node),
            Op::OpenSession { node, ttl_ms } => self.open_session(*node, *ttl_ms),
            Op::KeepAlive { session } => self.keep_alive(*session),
            Op::CloseSession { session } => self.close_session_op(*session),
            Op::Tick => Ok(self.tick()),
            Op::ExtendSessions => Ok(self.extend_sessions()),
            Op::SetPathStatus { node, status } => self.set_path_status(*node, status),
            Op::Acquire { session, key, mode } => self.acquire(*session, key, *mode),
            Op::Release { session, key } => Ok(self.release(*session, key)),
            Op::RequestBreak { key, requester } => self.request_break(key, *requester),
            Op::Reserve { session, blocks } => self.reserve(*session, *blocks),
            Op::Unreserve { session, ranges } => self.unreserve(*session, ranges),
            Op::Create {
                parent,
                name,
                kind,
                perm,
                uid,
                gid,
                rdev,
                symlink,
            } => self.create(
                *parent,
                name,
                *kind,
                namespace::Owner {
                    perm: *perm,
                    uid: *uid,
                    gid: *gid,
                    rdev: *rdev,
                },
                symlink.as_deref(),
            ),
            Op::Link {
                ino,
                new_parent,
                new_name,
            } => self.link(*ino, *new_parent, new_name),
            Op::Unlink { parent, name } => self.unlink(*parent, name),
            Op::Rmdir { parent, name } => self.rmdir(*parent, name),
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => self.rename(*parent, name, *new_parent, new_name, *flags),
            Op::SetAttr {
                ino,
                perm,
                uid,
                gid,
                size,
                atime,
                mtime,
            } => self.setattr(
                *ino,
                namespace::AttrChange {
                    perm: *perm,
                    uid: *uid,
                    gid: *gid,
                    size: *size,
                    atime: *atime,
                    mtime: *mtime,
                },
            ),
            Op::SetXattr {
                ino,
                name,
                value,
                flags,
            } => self.setxattr(*ino, name, value, *flags),
            Op::RemoveXattr { ino, name } => self.removexattr(*ino, name),
            Op::CommitWrite {
                session,
                ino,
                token,
                extents,
                size,
                mtime,
            } => self.commit_write(*session, *ino, *token, extents, *size, *mtime),
            Op::Fallocate {
                ino,
                offset,
                len,
                mode,
            } => self.fallocate(*ino, *offset, *len, *mode),
        }
    }

    /// The state's clock: the largest `now_ms` of any command applied.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    fn now_ts(&self) -> Timestamp {
        Timestamp::from_millis(self.now_ms)
    }

    /// The volume, once `InitVolume` has been applied.
    pub fn volume(&self) -> Option<&VolumeInfo> {
        self.volume.as_ref()
    }

    fn vol(&self) -> Result<&VolumeInfo, MetaError> {
        self.volume.as_ref().ok_or(MetaError::NoVolume)
    }

    fn init_volume(&mut self, info: &VolumeInfo) -> OpResult {
        if let Some(v) = &self.volume {
            return if v == info {
                Ok(Response::Ok)
            } else if v.uuid != info.uuid {
                Err(MetaError::Invalid(format!(
                    "volume is already initialised as {}",
                    v.uuid
                )))
            } else {
                Err(MetaError::Invalid(
                    "volume is already initialised with another geometry".into(),
                ))
            };
        }
        if info.block_size < 512 || !info.block_size.is_power_of_two() {
            return Err(MetaError::Invalid(format!(
                "block size {} is not a power of two >= 512",
                info.block_size
            )));
        }
        if info.data_start_block >= info.total_blocks {
            return Err(MetaError::Invalid(format!(
                "data start {} is not below the volume size {}",
                info.data_start_block, info.total_blocks
            )));
        }
        let now = self.now_ts();
        let root = Inode {
            attr: Attr {
                ino: csv_core::meta::ROOT_INO,
                kind: FileKind::Dir,
                size: 0,
                perm: 0o755,
                uid: 0,
                gid: 0,
                nlink: 2,
                rdev: 0,
                atime: now,
                mtime: now,
                ctime: now,
                crtime: now,
                generation: 0,
                blocks: 0,
            },
            parent: csv_core::meta::ROOT_INO,
            entries: BTreeMap::new(),
            extents: ExtentMap::new(),
            symlink: None,
            xattrs: BTreeMap::new(),
        };
        self.inodes.insert(csv_core::meta::ROOT_INO, root);
        self.next_ino = csv_core::meta::ROOT_INO + 1;
        self.free = RangeSet::default();
        self.free.insert(
            info.data_start_block,
            info.total_blocks - info.data_start_block,
        );
        self.volume = Some(info.clone());
        Ok(Response::Ok)
    }

    // ---- read side --------------------------------------------------------------------

    fn inode(&self, ino: Ino) -> Result<&Inode, MetaError> {
        self.inodes.get(&ino).ok_or(MetaError::NotFound)
    }

    fn dir(&self, ino: Ino) -> Result<&Inode, MetaError> {
        let i = self.inode(ino)?;
        if i.is_dir() {
            Ok(i)
        } else {
            Err(MetaError::NotDir)
        }
    }

    /// The attributes of `name` in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &str) -> Result<Attr, MetaError> {
        csv_core::meta::validate_name(name)?;
        let ino = *self
            .dir(parent)?
            .entries
            .get(name)
            .ok_or(MetaError::NotFound)?;
        self.getattr(ino)
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr, MetaError> {
        Ok(self.inode(ino)?.attr.clone())
    }

    /// A symlink's target; `Invalid` for other kinds (as readlink(2)'s EINVAL).
    pub fn readlink(&self, ino: Ino) -> Result<String, MetaError> {
        self.inode(ino)?
            .symlink
            .clone()
            .ok_or_else(|| MetaError::Invalid(format!("inode {ino} is not a symlink")))
    }

    /// Up to `limit` entries of `dir` sorted by name, starting after `after` (exclusive).
    /// `.` and `..` are not listed (the frontend adds them).
    pub fn readdir(
        &self,
        dir: Ino,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DirEntry>, MetaError> {
        use std::ops::Bound;
        let d = self.dir(dir)?;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        Ok(d.entries
            .range::<str, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(name, &ino)| DirEntry {
                name: name.clone(),
                ino,
                kind: self
                    .inodes
                    .get(&ino)
                    .map_or(FileKind::File, |i| i.attr.kind),
            })
            .collect())
    }

    /// Resolves a `/`-separated path relative to the root (leading `/`, empty and `.`
    /// components are ignored, `..` goes up). Symlinks are not followed.
    pub fn resolve_path(&self, path: &str) -> Result<Attr, MetaError> {
        let mut ino = csv_core::meta::ROOT_INO;
        for comp in path.split('/') {
            match comp {
                "" | "." => {
                    self.dir(ino)?;
                }
                ".." => ino = self.dir(ino)?.parent,
                name => {
                    csv_core::meta::validate_name(name)?;
                    ino = *self
                        .dir(ino)?
                        .entries
                        .get(name)
                        .ok_or(MetaError::NotFound)?;
                }
            }
        }
        self.getattr(ino)
    }

    /// The extents of `ino` overlapping file blocks `[first_block, first_block + nblocks)`,
    /// whole (not clipped), in file order.
    pub fn extents(
        &self,
        ino: Ino,
        first_block: u64,
        nblocks: u64,
    ) -> Result<Vec<Extent>, MetaError> {
        let end = first_block.saturating_add(nblocks);
        Ok(
            alloc::overlapping(&self.inode(ino)?.extents, first_block, end)
                .copied()
                .collect(),
        )
    }

    pub fn getxattr(&self, ino: Ino, name: &str) -> Result<Vec<u8>, MetaError> {
        self.inode(ino)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or(MetaError::NoAttr)
    }

    /// Names of the extended attributes of `ino`, sorted.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<String>, MetaError> {
        Ok(self.inode(ino)?.xattrs.keys().cloned().collect())
    }

    /// Space figures for `statfs` (zeros before `InitVolume`).
    pub fn space(&self) -> SpaceInfo {
        let (block_size, data_blocks) = self.volume.as_ref().map_or((0, 0), |v| {
            (v.block_size, v.total_blocks - v.data_start_block)
        });
        SpaceInfo {
            block_size,
            data_blocks,
            free_blocks: self.free.total(),
            reserved_blocks: self.sessions.values().map(|s| s.reserved.total()).sum(),
            inodes: self.inodes.len() as u64,
        }
    }

    pub fn sessions(&self) -> impl Iterator<Item = &SessionInfo> {
        self.sessions.values().map(|s| &s.info)
    }

    pub fn session(&self, id: SessionId) -> Option<&SessionInfo> {
        self.sessions.get(&id).map(|s| &s.info)
    }

    /// The ranges reserved to `session` (empty if it has none or is gone).
    pub fn reservations(&self, session: SessionId) -> Vec<BlockRange> {
        self.sessions
            .get(&session)
            .map(|s| s.reserved.iter().collect())
            .unwrap_or_default()
    }

    /// Every held lock, sorted by key.
    pub fn locks(&self) -> Vec<LockInfo> {
        self.locks.iter().map(|(k, l)| lock_info(k, l)).collect()
    }

    pub fn lock(&self, key: &str) -> Option<LockInfo> {
        self.locks.get(key).map(|l| lock_info(key, l))
    }

    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.nodes.values().cloned().collect()
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeRecord> {
        self.nodes.get(&id)
    }

    /// The last fencing token handed out (0: none yet).
    pub fn last_token(&self) -> FencingToken {
        self.last_token
    }
}

fn lock_info(key: &str, l: &Lock) -> LockInfo {
    LockInfo {
        key: key.to_string(),
        holders: l.holders.clone(),
        break_requested_by: l.break_requested_by,
    }
}
