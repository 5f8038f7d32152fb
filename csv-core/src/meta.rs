//! The metadata model: what the Raft state machine stores and the volume layer reads.
//!
//! Metadata lives in the metadata service (Raft), data lives on the LUN. These plain
//! types are shared by both sides; they carry no behaviour that needs I/O.
//!
//! Units: file sizes and offsets are bytes; extents are counted in volume blocks
//! (`VolumeInfo::block_size`, 4096 by default); times are milliseconds or
//! [`Timestamp`]s proposed by the Raft leader, never read from a replica's clock.

use serde::{Deserialize, Serialize};

/// A cluster node (1..=16 in a local cluster; any non-zero u64 in general).
pub type NodeId = u64;
/// An inode number. [`ROOT_INO`] is the volume root.
pub type Ino = u64;
/// A node session (lease) in the metadata service.
pub type SessionId = u64;
/// A fencing token: strictly increasing across every grant of any lock.
pub type FencingToken = u64;

/// The inode number of the volume root directory.
pub const ROOT_INO: Ino = 1;
/// Longest file name in bytes (as ext4, and FUSE's `namelen`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target in bytes.
pub const MAX_SYMLINK_LEN: usize = 4095;
/// Largest file size in bytes (16 TiB, the largest VHD-backed disk we serve).
pub const MAX_FILE_SIZE: u64 = 1 << 44;
/// Largest extended attribute value.
pub const MAX_XATTR_VALUE: usize = 64 * 1024;

/// A point in time, as the leader proposed it (seconds and nanoseconds since the Unix epoch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn from_millis(ms: u64) -> Self {
        Timestamp {
            secs: (ms / 1000) as i64,
            nanos: ((ms % 1000) * 1_000_000) as u32,
        }
    }
}

/// The volume's identity and geometry; also recorded in the LUN superblock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// The volume UUID, as text (`uuid::Uuid::to_string`).
    pub uuid: String,
    pub block_size: u32,
    /// Blocks on the LUN in all (including the superblock area).
    pub total_blocks: u64,
    /// First block that may hold file data (the superblock area comes before).
    pub data_start_block: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// The attributes of an inode (what `stat` shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`0o7777`), without the file type.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// Bumped every time an inode number is reused (never, today: numbers are not reused).
    pub generation: u64,
    /// Blocks allocated to the file (written or unwritten), in volume blocks.
    pub blocks: u64,
}

/// Whether an extent's blocks hold data or read as zeros (fallocated, like ext4's unwritten extents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExtentState {
    Written,
    Unwritten,
}

/// A run of file blocks mapped to a run of LUN blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub file_block: u64,
    pub lun_block: u64,
    /// Length in blocks (> 0).
    pub len: u64,
    pub state: ExtentState,
}

impl Extent {
    pub fn file_end(&self) -> u64 {
        self.file_block + self.len
    }
    pub fn lun_end(&self) -> u64 {
        self.lun_block + self.len
    }
}

/// Extents keyed by their first file block, none overlapping: the one representation of a
/// file's block map, shared by the state machine and the volume layer's cache.
pub type ExtentTree = std::collections::BTreeMap<u64, Extent>;

/// Extents of `map` overlapping file blocks `[first, end)`, whole, in file order.
pub fn extents_overlapping(
    map: &ExtentTree,
    first: u64,
    end: u64,
) -> impl Iterator<Item = &Extent> {
    let before = map
        .range(..first)
        .next_back()
        .map(|(_, e)| e)
        .filter(|e| e.file_end() > first);
    before
        .into_iter()
        .chain(map.range(first..end.max(first)).map(|(_, e)| e))
}

/// Removes the mapping of file blocks `[first, end)` from `map`, splitting extents at the
/// edges; returns the removed pieces in file order.
pub fn cut_extents(map: &mut ExtentTree, first: u64, end: u64) -> Vec<Extent> {
    if first >= end {
        return Vec::new();
    }
    let hit: Vec<Extent> = extents_overlapping(map, first, end).copied().collect();
    let mut removed = Vec::with_capacity(hit.len());
    for e in hit {
        map.remove(&e.file_block);
        if e.file_block < first {
            let keep = first - e.file_block;
            map.insert(e.file_block, Extent { len: keep, ..e });
        }
        if e.file_end() > end {
            let skip = end - e.file_block;
            map.insert(
                end,
                Extent {
                    file_block: end,
                    lun_block: e.lun_block + skip,
                    len: e.len - skip,
                    state: e.state,
                },
            );
        }
        let lo = e.file_block.max(first);
        let hi = e.file_end().min(end);
        removed.push(Extent {
            file_block: lo,
            lun_block: e.lun_block + (lo - e.file_block),
            len: hi - lo,
            state: e.state,
        });
    }
    removed
}

/// A run of LUN blocks (free space, a reservation, or space to discard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockRange {
    pub start: u64,
    pub len: u64,
}

impl BlockRange {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// One holder of a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub session: SessionId,
    pub node: NodeId,
    pub mode: LockMode,
    pub token: FencingToken,
    pub since_ms: u64,
}

/// A lock as the metadata service reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub key: String,
    pub holders: Vec<LockHolder>,
    /// A node asked the holders to flush and release (cooperative break).
    pub break_requested_by: Option<NodeId>,
}

/// The lock key that guards writes to a file's data (the NBD/FUSE writer lock).
pub fn data_lock_key(ino: Ino) -> String {
    format!("data:{ino}")
}

/// Per-node SAN path state, as `Get-ClusterSharedVolumeState` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathState {
    Direct,
    Redirected,
    Paused,
}

impl PathState {
    pub fn as_str(&self) -> &'static str {
        match self {
            PathState::Direct => "direct",
            PathState::Redirected => "redirected",
            PathState::Paused => "paused",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStatus {
    pub state: PathState,
    /// Why the node is not direct ("no disk connectivity", "user request", ...).
    pub reason: Option<String>,
    pub since_ms: u64,
    /// The peer carrying this node's I/O while redirected.
    pub peer: Option<NodeId>,
}

impl Default for PathStatus {
    fn default() -> Self {
        PathStatus {
            state: PathState::Direct,
            reason: None,
            since_ms: 0,
            peer: None,
        }
    }
}

/// A node as the metadata service records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub rpc_addr: String,
    pub nbd_addr: String,
    pub mount: String,
    pub path: PathStatus,
    /// The node's current session, if it has one.
    pub session: Option<SessionId>,
    pub last_heartbeat_ms: u64,
}

/// A node session (lease): locks and reservations belong to it and die with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: SessionId,
    pub node: NodeId,
    pub ttl_ms: u64,
    /// Leader time after which the session is expired by the next tick.
    pub expires_at_ms: u64,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub ino: Ino,
    pub kind: FileKind,
}

/// Space figures for `statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceInfo {
    pub block_size: u32,
    /// Blocks that can hold file data.
    pub data_blocks: u64,
    /// Blocks in the free pool (not counting node reservations).
    pub free_blocks: u64,
    /// Blocks reserved to node sessions and not yet used.
    pub reserved_blocks: u64,
    pub inodes: u64,
}

/// `fallocate(2)` modes the volume supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FallocMode {
    /// Allocate unwritten extents; extend the size unless `keep_size`.
    Allocate { keep_size: bool },
    /// Free whole blocks in the range (size unchanged); partial edges are zeroed by the caller.
    PunchHole,
    /// Whole blocks become unwritten (read as zeros) and are allocated if missing;
    /// partial edges are zeroed by the caller; extends the size unless `keep_size`.
    ZeroRange { keep_size: bool },
}

/// Flags of `renameat2(2)`.
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;

/// What the metadata layer refused to do. Each maps to one errno at the FUSE edge and
/// one NBD error at the NBD edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    #[error("invalid name (empty, '.', '..', or contains '/' or NUL)")]
    InvalidName,
    #[error("no space left on the volume")]
    NoSpace,
    #[error("file too large")]
    FileTooBig,
    #[error("too many links")]
    TooManyLinks,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no such attribute")]
    NoAttr,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("fenced: token {given} is stale (current {current})")]
    Fenced {
        given: FencingToken,
        current: FencingToken,
    },
    #[error("lock {key} is held by another session")]
    LockBusy { key: String },
    #[error("session {0} is expired or unknown")]
    SessionExpired(SessionId),
    #[error("the volume is not initialised")]
    NoVolume,
}

/// Checks one path component for the namespace.
pub fn validate_name(name: &str) -> Result<(), MetaError> {
    if name.len() > MAX_NAME_LEN {
        return Err(MetaError::NameTooLong);
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(MetaError::InvalidName);
    }
    Ok(())
}
