//! The command language of the metadata service: every metadata change is one [`Op`],
//! answered by one [`Response`]. Plain data: the Raft service (lockmgr) logs and applies
//! them, the volume layer and the frontends submit them.

use serde::{Deserialize, Serialize};

use crate::meta::{
    Attr, BlockRange, Extent, FallocMode, FencingToken, FileKind, Ino, LockMode, MetaError, NodeId,
    PathStatus, SessionId, Timestamp, VolumeInfo,
};

/// What a command does. Grouped by the part of the state it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    // ---- volume ------------------------------------------------------------------
    /// Records the volume (once; a second call with another UUID is refused with `Invalid`).
    /// Creates the root directory and the free pool `[data_start_block, total_blocks)`.
    InitVolume {
        info: VolumeInfo,
    },

    // ---- nodes and sessions ----------------------------------------------------------
    /// Adds or updates a node record (addresses). Keeps its path status and session.
    RegisterNode {
        node: NodeId,
        rpc_addr: String,
        nbd_addr: String,
        mount: String,
    },
    /// Removes a node record (after `node drain`/removal); closes its session.
    RemoveNode {
        node: NodeId,
    },
    /// Opens a session for `node` with the given TTL. Response: `Session`.
    /// A node has at most one live session: opening a new one closes the old one
    /// (its locks are released and its reservations return to the pool).
    OpenSession {
        node: NodeId,
        ttl_ms: u64,
    },
    /// Renews a session: `expires_at = now + ttl`. Also stamps the node's heartbeat.
    /// Response: `Ok`, or `Err(SessionExpired)` if the session is gone.
    KeepAlive {
        session: SessionId,
    },
    /// Closes a session: releases its locks, returns its reservations to the pool.
    CloseSession {
        session: SessionId,
    },
    /// Proposed periodically by the leader: expires every session with `expires_at < now`.
    /// Response: `Expired(ids)`.
    Tick,
    /// Proposed by a new leader before its first `Tick`: every session gets
    /// `expires_at = max(expires_at, now + ttl)` (a new leader waits one TTL before
    /// expiring anyone).
    ExtendSessions,
    /// Records a node's SAN path state (published by its redirector).
    SetPathStatus {
        node: NodeId,
        status: PathStatus,
    },

    // ---- locks -------------------------------------------------------------------------
    /// Acquires `key` for `session`. Shared locks coexist; exclusive excludes all others.
    /// Re-acquiring a lock the session already holds in the same mode returns the same
    /// token. A sole shared holder may upgrade to exclusive (new token). Every new grant
    /// takes the next fencing token. Response: `Lock(token)` or `Err(LockBusy)`.
    Acquire {
        session: SessionId,
        key: String,
        mode: LockMode,
    },
    /// Releases `key` held by `session` (no-op if not held). Clears a pending break
    /// once no holder is left.
    Release {
        session: SessionId,
        key: String,
    },
    /// Asks the holders of `key` to flush and release (recorded in the lock; holders
    /// watch for it). Response: `Ok`, or `Err(NotFound)` if nobody holds it.
    RequestBreak {
        key: String,
        requester: NodeId,
    },

    // ---- allocation --------------------------------------------------------------------
    /// Reserves up to `blocks` free blocks (at least one) to `session`, as few ranges as
    /// possible. Response: `Reserved(ranges)` or `Err(NoSpace)`.
    Reserve {
        session: SessionId,
        blocks: u64,
    },
    /// Gives unused reserved blocks back to the pool.
    Unreserve {
        session: SessionId,
        ranges: Vec<BlockRange>,
    },

    // ---- namespace ---------------------------------------------------------------------
    /// Creates `name` in `parent`. `symlink` is the target for `FileKind::Symlink`.
    /// Response: `Attr` of the new inode, or `Err(Exists)` etc.
    Create {
        parent: Ino,
        name: String,
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        symlink: Option<String>,
    },
    /// Hard link. Response: `Attr` of `ino` (nlink + 1). Directories cannot be linked.
    Link {
        ino: Ino,
        new_parent: Ino,
        new_name: String,
    },
    /// Removes a non-directory entry. When nlink reaches 0 the inode and its extents are
    /// freed (blocks to the pool). Response: `Freed(ranges)` (for discard), or `Err`.
    Unlink {
        parent: Ino,
        name: String,
    },
    /// Removes an empty directory. Response: `Ok` or `Err(NotEmpty | NotDir | ..)`.
    Rmdir {
        parent: Ino,
        name: String,
    },
    /// `renameat2` with `RENAME_NOREPLACE` / `RENAME_EXCHANGE` flags (0 = plain rename,
    /// which replaces a compatible target). Response: `Freed(ranges)` (a replaced file's
    /// space) or `Err`.
    Rename {
        parent: Ino,
        name: String,
        new_parent: Ino,
        new_name: String,
        flags: u32,
    },
    /// `setattr`: each `Some` field is changed; `size` truncates (freeing whole blocks
    /// past the new end) or extends (sparse). Response: `AttrFreed(attr, ranges)`.
    SetAttr {
        ino: Ino,
        perm: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<Timestamp>,
        mtime: Option<Timestamp>,
    },
    SetXattr {
        ino: Ino,
        name: String,
        value: Vec<u8>,
        /// `XATTR_CREATE` = 1 (fail if exists), `XATTR_REPLACE` = 2 (fail if missing).
        flags: u32,
    },
    RemoveXattr {
        ino: Ino,
        name: String,
    },

    // ---- data mapping -------------------------------------------------------------------
    /// Commits written data (step 3 of the write path). `extents` are `Written` extents
    /// whose LUN blocks come from `session`'s reservations (they leave the reservation)
    /// or that re-map blocks the file already owns (unwritten -> written conversion).
    /// Old mappings they overlap are replaced and their blocks return to the pool.
    /// If `token` is given, `session` must hold `data_lock_key(ino)` exclusively with
    /// exactly that token, else `Err(Fenced)`. `size` extends the file (never shrinks).
    /// Response: `AttrFreed(attr, freed ranges)`.
    CommitWrite {
        session: SessionId,
        ino: Ino,
        token: Option<FencingToken>,
        extents: Vec<Extent>,
        size: Option<u64>,
        mtime: Timestamp,
    },
    /// `fallocate(2)` over byte range `[offset, offset + len)`. New space for
    /// `Allocate`/`ZeroRange` comes straight from the pool as `Unwritten` extents.
    /// Response: `AttrFreed(attr, freed ranges)` (freed = what to discard on the LUN).
    Fallocate {
        ino: Ino,
        offset: u64,
        len: u64,
        mode: FallocMode,
    },
}

/// The answer to one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Ok,
    Session(SessionId),
    Expired(Vec<SessionId>),
    Lock(FencingToken),
    Reserved(Vec<BlockRange>),
    Attr(Attr),
    Freed(Vec<BlockRange>),
    AttrFreed(Attr, Vec<BlockRange>),
    Err(MetaError),
}

impl Response {
    /// Turns `Response::Err` into `Err`.
    pub fn into_result(self) -> Result<Response, MetaError> {
        match self {
            Response::Err(e) => Err(e),
            r => Ok(r),
        }
    }
}

/// Default: `Ok` (openraft requires `R: Default` for blank and membership entries).
impl Default for Response {
    fn default() -> Self {
        Response::Ok
    }
}
