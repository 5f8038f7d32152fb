//! The volume layer: POSIX file semantics over the metadata service ([`MetaClient`]) and
//! the shared LUN ([`Lun`]), protocol-agnostic (the FUSE and NBD frontends are thin
//! adapters over [`Volume`] and [`OpenFile`]).
//!
//! What it owns:
//! - namespace operations, turned into [`Op`]s;
//! - the data path: reads map extents to LUN reads (holes and unwritten extents read as
//!   zeros); writes follow the ordered write path (`docs/write-path.md`);
//! - cross-node coherence of file data with the per-file data lock
//!   ([`data_lock_key`]): a node reads under the shared lock and writes under the
//!   exclusive one, caching the extent map and size only while it holds the lock; a node
//!   that needs a lock another holds asks for a break, and the holder (watching the
//!   change feed) commits, drops its cache and releases;
//! - this node's allocation chunks ([`reserve::ReservePool`]) and advisory locks.
//!
//! Invariants:
//! - no LUN write is issued unless the lease is valid (`MetaClient::may_write`) and, for
//!   file data, this node holds the file's exclusive data lock;
//! - a block that becomes part of a file is written whole before it is committed: the
//!   parts the caller did not write are zeros, never stale LUN bytes;
//! - file data reaches the LUN (and is flushed) before the metadata pointing to it is
//!   committed, and fsync is acknowledged only after both;
//! - blocks leave a file (truncate, punch hole, unlink) only after this node discarded
//!   them while still holding the exclusive lock, never after they returned to the pool
//!   (where another node may already be writing them);
//! - past a file's size, the rest of its last block reads as zeros on the LUN.

pub mod advisory;
pub mod client;
pub mod extents;
mod file;
pub mod reserve;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

pub use advisory::{AdvisoryKind, AdvisoryLock};
pub use client::{
    Applied, Consistency, MetaAnswer, MetaClient, MetaClientError, MetaFuture, MetaQuery,
};
pub use file::OpenFile;

use crate::lock;
use crate::lun::{Lun, LunError};
use crate::meta::{
    Attr, BlockRange, DirEntry, FileKind, Ino, LockMode, MetaError, SpaceInfo, Timestamp,
    VolumeInfo, data_lock_key, validate_name,
};
use crate::op::{Op, Response};
use file::FileState;
use reserve::ReservePool;

/// Tunables of the volume layer.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// How many bytes to reserve at a time for new data.
    pub reserve_chunk_bytes: u64,
    /// New blocks are placed so that a file offset and its LUN offset agree modulo this
    /// many bytes, where the node's reserved space allows (0 or one block: anywhere).
    /// Whole aligned units of a file then sit on whole aligned units of the LUN: a
    /// buffered LUN caches each in one large page-cache folio (a 1 MiB write 4 KiB off
    /// alignment took 9 folio steps instead of one), and an array's stripes line up.
    pub placement_bytes: u64,
    /// Written data is committed at most this long after the write (or at fsync/close).
    pub commit_delay: Duration,
    /// How long an operation waits for a data lock another node holds.
    pub lock_wait: Duration,
    /// After giving a lock up to a break, wait this long before taking it again
    /// (lets the requester in; ping-pong is bounded by it).
    pub break_holdoff: Duration,
    /// How often held locks are checked for break requests and session loss
    /// (besides the change feed).
    pub scan_interval: Duration,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            reserve_chunk_bytes: 32 << 20,
            placement_bytes: 1 << 20,
            commit_delay: Duration::from_millis(10),
            lock_wait: Duration::from_secs(60),
            break_holdoff: Duration::from_millis(20),
            scan_interval: Duration::from_millis(100),
        }
    }
}

/// What the volume layer failed to do. Each variant maps to one errno at the FUSE edge.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("the metadata service refused the operation")]
    Meta(#[source] MetaError),
    #[error("the metadata service could not be reached")]
    Unavailable(#[source] MetaClientError),
    #[error("LUN I/O failed")]
    Lun(#[source] LunError),
    #[error("this node's lease is not valid: writes are fenced")]
    Fenced,
    #[error("timed out waiting for lock {0} held by another node")]
    LockTimeout(String),
    #[error("writing back data of inode {0} failed; data written since the last fsync may be lost")]
    WriteBack(Ino),
    #[error("writes to inode {0} through this handle were revoked (ownership handed over)")]
    WriteRevoked(Ino),
    #[error("an advisory lock conflicts")]
    WouldBlock,
    #[error("inode {0} was removed")]
    Stale(Ino),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("the LUN does not fit the volume: {0}")]
    Geometry(String),
}

impl From<MetaClientError> for VolumeError {
    fn from(e: MetaClientError) -> Self {
        match e {
            MetaClientError::Meta(m) => VolumeError::Meta(m),
            MetaClientError::NoSession => VolumeError::Fenced,
            other => VolumeError::Unavailable(other),
        }
    }
}

impl From<MetaError> for VolumeError {
    fn from(e: MetaError) -> Self {
        VolumeError::Meta(e)
    }
}

impl From<LunError> for VolumeError {
    fn from(e: LunError) -> Self {
        match e {
            LunError::Fenced { .. } => VolumeError::Fenced,
            other => VolumeError::Lun(other),
        }
    }
}

pub type VolumeResult<T> = Result<T, VolumeError>;

/// Attribute changes of `setattr`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
}

/// The wall clock, for timestamps the volume proposes (mtime of writes, `utimes(NOW)`).
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        secs: d.as_secs() as i64,
        nanos: d.subsec_nanos(),
    }
}

/// One mounted volume on this node. Cheap to clone.
#[derive(Clone)]
pub struct Volume {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("uuid", &self.shared.info.uuid)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    meta: Arc<dyn MetaClient>,
    lun: Arc<dyn Lun>,
    info: VolumeInfo,
    bs: u64,
    align: u64,
    cfg: VolumeConfig,
    files: Mutex<HashMap<Ino, Arc<FileState>>>,
    reserve: Mutex<ReservePool>,
    refill: tokio::sync::Mutex<()>,
    advisory: advisory::Table,
    stop: watch::Sender<bool>,
    me: Weak<Shared>,
    /// The runtime background work runs on (handles may be dropped on other threads).
    pub(crate) rt: tokio::runtime::Handle,
}

macro_rules! answer {
    ($e:expr, $v:ident) => {
        match $e {
            MetaAnswer::$v(x) => Ok(x),
            other => Err(VolumeError::Unavailable(MetaClientError::Protocol(
                format!("expected {}, got {other:?}", stringify!($v)),
            ))),
        }
    };
}
pub(crate) use answer;

impl Volume {
    /// Attaches the volume: reads its record, checks the LUN fits it, and starts the
    /// task that answers lock breaks. Must be called inside a tokio runtime.
    pub async fn open(
        meta: Arc<dyn MetaClient>,
        lun: Arc<dyn Lun>,
        cfg: VolumeConfig,
    ) -> VolumeResult<Volume> {
        let info = answer!(
            meta.query(MetaQuery::Volume, Consistency::Linearizable)
                .await?,
            Volume
        )?
        .ok_or(VolumeError::Meta(MetaError::NoVolume))?;
        let bs = u64::from(info.block_size);
        let align = u64::from(lun.alignment().max(1));
        if !bs.is_multiple_of(align) {
            return Err(VolumeError::Geometry(format!(
                "block size {bs} is not a multiple of the LUN alignment {align}"
            )));
        }
        if lun.size() < info.total_blocks * bs {
            return Err(VolumeError::Geometry(format!(
                "LUN has {} bytes, the volume needs {}",
                lun.size(),
                info.total_blocks * bs
            )));
        }
        let shared = Arc::new_cyclic(|me| Shared {
            me: me.clone(),
            rt: tokio::runtime::Handle::current(),
            meta,
            lun,
            info,
            bs,
            align,
            cfg,
            files: Mutex::new(HashMap::new()),
            reserve: Mutex::new(ReservePool::default()),
            refill: tokio::sync::Mutex::new(()),
            advisory: advisory::Table::default(),
            stop: watch::channel(false).0,
        });
        let feed = shared.meta.subscribe();
        tokio::spawn(file::watch_breaks(Arc::downgrade(&shared), feed));
        Ok(Volume { shared })
    }

    pub fn info(&self) -> &VolumeInfo {
        &self.shared.info
    }

    pub fn block_size(&self) -> u64 {
        self.shared.bs
    }

    /// The feed of applied metadata commands (frontends invalidate their caches from it).
    pub fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.shared.meta.subscribe()
    }

    /// Commits every file's pending writes, releases this node's locks and gives its
    /// unused reservation back. The volume stays usable (locks are re-taken on demand).
    pub async fn shutdown(&self) -> VolumeResult<()> {
        self.shared.stop.send_replace(true);
        let files: Vec<Arc<FileState>> = lock(&self.shared.files).values().cloned().collect();
        let mut first_err = None;
        for fs in files {
            if let Err(e) = self.shared.give_up(&fs).await {
                first_err.get_or_insert(e);
            }
        }
        self.shared.advisory.release_all(&*self.shared.meta).await;
        let (session, ranges) = lock(&self.shared.reserve).drain();
        if let (Some(session), false) = (session, ranges.is_empty())
            && self.shared.meta.session() == Some(session)
        {
            self.shared
                .meta
                .submit(Op::Unreserve { session, ranges })
                .await?;
        }
        first_err.map_or(Ok(()), Err)
    }

    // ---- namespace ------------------------------------------------------------------

    pub async fn lookup(&self, parent: Ino, name: &str) -> VolumeResult<Attr> {
        validate_name(name)?;
        let attr = answer!(
            self.shared
                .meta
                .query(
                    MetaQuery::Lookup {
                        parent,
                        name: name.to_string(),
                    },
                    Consistency::Linearizable,
                )
                .await?,
            Attr
        )?;
        Ok(self.shared.overlay(attr))
    }

    /// Attributes (linearizable), with this node's view of the size of a file it writes.
    pub async fn getattr(&self, ino: Ino) -> VolumeResult<Attr> {
        let attr = self.shared.getattr(ino, Consistency::Linearizable).await?;
        Ok(self.shared.overlay(attr))
    }

    /// Creates a file, directory, device node, FIFO or socket.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        parent: Ino,
        name: &str,
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
    ) -> VolumeResult<Attr> {
        validate_name(name)?;
        if kind == FileKind::Symlink {
            return Err(VolumeError::Invalid("use symlink() for symlinks".into()));
        }
        self.shared
            .submit_attr(Op::Create {
                parent,
                name: name.to_string(),
                kind,
                perm,
                uid,
                gid,
                rdev,
                symlink: None,
            })
            .await
    }

    pub async fn symlink(
        &self,
        parent: Ino,
        name: &str,
        target: &str,
        uid: u32,
        gid: u32,
    ) -> VolumeResult<Attr> {
        validate_name(name)?;
        self.shared
            .submit_attr(Op::Create {
                parent,
                name: name.to_string(),
                kind: FileKind::Symlink,
                perm: 0o777,
                uid,
                gid,
                rdev: 0,
                symlink: Some(target.to_string()),
            })
            .await
    }

    pub async fn link(&self, ino: Ino, new_parent: Ino, new_name: &str) -> VolumeResult<Attr> {
        validate_name(new_name)?;
        let attr = self
            .shared
            .submit_attr(Op::Link {
                ino,
                new_parent,
                new_name: new_name.to_string(),
            })
            .await?;
        Ok(self.shared.overlay(attr))
    }

    pub async fn readlink(&self, ino: Ino) -> VolumeResult<String> {
        answer!(
            self.shared
                .meta
                .query(MetaQuery::ReadLink(ino), Consistency::Local)
                .await?,
            Target
        )
    }

    /// Removes a non-directory. If it was the file's last link, this node first takes
    /// the file's exclusive data lock (so no other node still writes it) and discards
    /// its blocks.
    pub async fn unlink(&self, parent: Ino, name: &str) -> VolumeResult<()> {
        validate_name(name)?;
        let attr = self.lookup(parent, name).await?;
        let op = Op::Unlink {
            parent,
            name: name.to_string(),
        };
        if attr.kind == FileKind::File && attr.nlink <= 1 {
            self.shared.remove_file(attr.ino, op).await
        } else if attr.kind == FileKind::Dir {
            Err(VolumeError::Meta(MetaError::IsDir))
        } else {
            self.shared.meta.submit(op).await?;
            Ok(())
        }
    }

    pub async fn rmdir(&self, parent: Ino, name: &str) -> VolumeResult<()> {
        validate_name(name)?;
        self.shared
            .meta
            .submit(Op::Rmdir {
                parent,
                name: name.to_string(),
            })
            .await?;
        Ok(())
    }

    /// `renameat2` with `RENAME_NOREPLACE`/`RENAME_EXCHANGE`. A plain rename that
    /// replaces a file's last link removes it like [`Self::unlink`].
    pub async fn rename(
        &self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        flags: u32,
    ) -> VolumeResult<()> {
        validate_name(name)?;
        validate_name(new_name)?;
        let op = Op::Rename {
            parent,
            name: name.to_string(),
            new_parent,
            new_name: new_name.to_string(),
            flags,
        };
        if flags == 0 {
            let src = self.lookup(parent, name).await?;
            match self.lookup(new_parent, new_name).await {
                Ok(dst)
                    if dst.ino != src.ino
                        && dst.kind == FileKind::File
                        && src.kind != FileKind::Dir
                        && dst.nlink <= 1 =>
                {
                    return self.shared.remove_file(dst.ino, op).await;
                }
                Ok(_) | Err(VolumeError::Meta(MetaError::NotFound)) => {}
                Err(e) => return Err(e),
            }
        }
        self.shared.meta.submit(op).await?;
        Ok(())
    }

    /// Changes attributes; a size change truncates or extends the file under its
    /// exclusive data lock.
    pub async fn setattr(&self, ino: Ino, ch: SetAttr) -> VolumeResult<Attr> {
        let mut attr = None;
        if let Some(size) = ch.size {
            attr = Some(self.shared.truncate(ino, size).await?);
        }
        let rest = SetAttr { size: None, ..ch };
        if rest != SetAttr::default() {
            let r = self
                .shared
                .meta
                .submit(Op::SetAttr {
                    ino,
                    perm: rest.perm,
                    uid: rest.uid,
                    gid: rest.gid,
                    size: None,
                    atime: rest.atime,
                    mtime: rest.mtime,
                })
                .await?;
            match r {
                Response::AttrFreed(a, _) | Response::Attr(a) => attr = Some(a),
                other => {
                    return Err(VolumeError::Unavailable(MetaClientError::Protocol(
                        format!("SetAttr answered {other:?}"),
                    )));
                }
            }
        }
        match attr {
            Some(a) => Ok(self.shared.overlay(a)),
            None => self.getattr(ino).await,
        }
    }

    /// Up to `limit` entries of `dir` after `after`, sorted by name (no `.`/`..`).
    pub async fn readdir(
        &self,
        dir: Ino,
        after: Option<&str>,
        limit: usize,
    ) -> VolumeResult<Vec<DirEntry>> {
        answer!(
            self.shared
                .meta
                .query(
                    MetaQuery::ReadDir {
                        dir,
                        after: after.map(str::to_string),
                        limit,
                    },
                    Consistency::Local,
                )
                .await?,
            Entries
        )
    }

    /// Attributes from this node's replica (for listings), with this node's view of the
    /// size of a file it writes.
    pub async fn getattr_local(&self, ino: Ino) -> VolumeResult<Attr> {
        let attr = self.shared.getattr(ino, Consistency::Local).await?;
        Ok(self.shared.overlay(attr))
    }

    pub async fn setxattr(
        &self,
        ino: Ino,
        name: &str,
        value: &[u8],
        flags: u32,
    ) -> VolumeResult<()> {
        self.shared
            .meta
            .submit(Op::SetXattr {
                ino,
                name: name.to_string(),
                value: value.to_vec(),
                flags,
            })
            .await?;
        Ok(())
    }

    pub async fn getxattr(&self, ino: Ino, name: &str) -> VolumeResult<Vec<u8>> {
        answer!(
            self.shared
                .meta
                .query(
                    MetaQuery::GetXattr {
                        ino,
                        name: name.to_string(),
                    },
                    Consistency::Local,
                )
                .await?,
            Value
        )
    }

    pub async fn listxattr(&self, ino: Ino) -> VolumeResult<Vec<String>> {
        answer!(
            self.shared
                .meta
                .query(MetaQuery::ListXattr(ino), Consistency::Local)
                .await?,
            Names
        )
    }

    pub async fn removexattr(&self, ino: Ino, name: &str) -> VolumeResult<()> {
        self.shared
            .meta
            .submit(Op::RemoveXattr {
                ino,
                name: name.to_string(),
            })
            .await?;
        Ok(())
    }

    /// Space figures: blocks reserved to nodes but not yet used count as free.
    pub async fn statfs(&self) -> VolumeResult<SpaceInfo> {
        answer!(
            self.shared
                .meta
                .query(MetaQuery::Space, Consistency::Local)
                .await?,
            Space
        )
    }

    // ---- files ----------------------------------------------------------------------

    /// Opens a regular file for I/O. Opening does a linearizable read of its attributes,
    /// so the caller sees every change committed before the open (close-to-open).
    pub async fn open_file(&self, ino: Ino, writable: bool) -> VolumeResult<(OpenFile, Attr)> {
        let attr = self.shared.getattr(ino, Consistency::Linearizable).await?;
        match attr.kind {
            FileKind::File => {}
            FileKind::Dir => return Err(VolumeError::Meta(MetaError::IsDir)),
            _ => {
                return Err(VolumeError::Invalid(format!(
                    "inode {ino} is not a regular file"
                )));
            }
        }
        let fs = self.shared.file_ref(ino);
        let attr = self.shared.overlay(attr);
        Ok((OpenFile::new(self.shared.clone(), fs, writable), attr))
    }

    // ---- advisory locks (POSIX fcntl and flock), held across nodes --------------------

    /// The first lock conflicting with `kind` over `[start, end]` for `owner`, if any.
    pub async fn getlk(
        &self,
        ino: Ino,
        owner: u64,
        start: u64,
        end: u64,
        kind: AdvisoryKind,
    ) -> VolumeResult<Option<AdvisoryLock>> {
        self.shared
            .advisory
            .getlk(&*self.shared.meta, ino, owner, start, end, kind)
            .await
    }

    /// Sets (`Some(kind)`) or clears (`None`) `owner`'s lock over `[start, end]`.
    /// With `wait`, polls until the lock is free; else fails with `WouldBlock`.
    #[allow(clippy::too_many_arguments)]
    pub async fn setlk(
        &self,
        ino: Ino,
        owner: u64,
        start: u64,
        end: u64,
        kind: Option<AdvisoryKind>,
        pid: u32,
        wait: bool,
    ) -> VolumeResult<()> {
        self.shared
            .advisory
            .setlk(&*self.shared.meta, ino, owner, start, end, kind, pid, wait)
            .await
    }

    /// Drops every advisory lock `owner` holds on `ino` (on close).
    pub async fn unlock_owner(&self, ino: Ino, owner: u64) -> VolumeResult<()> {
        self.shared
            .advisory
            .setlk(&*self.shared.meta, ino, owner, 0, u64::MAX, None, 0, false)
            .await
    }
}

impl Shared {
    pub(crate) async fn getattr(&self, ino: Ino, c: Consistency) -> VolumeResult<Attr> {
        answer!(self.meta.query(MetaQuery::GetAttr(ino), c).await?, Attr)
    }

    async fn submit_attr(&self, op: Op) -> VolumeResult<Attr> {
        match self.meta.submit(op).await? {
            Response::Attr(a) | Response::AttrFreed(a, _) => Ok(a),
            other => Err(VolumeError::Unavailable(MetaClientError::Protocol(
                format!("expected attributes, got {other:?}"),
            ))),
        }
    }

    /// `attr` with this node's view of the size (its not-yet-committed writes) when it
    /// holds the file's data lock.
    fn overlay(&self, mut attr: Attr) -> Attr {
        if let Some(fs) = lock(&self.files).get(&attr.ino).cloned()
            && let Some((size, blocks)) = fs.local_size()
        {
            attr.size = size;
            attr.blocks = attr.blocks.max(blocks);
        }
        attr
    }

    /// Discards LUN blocks this node still owns through an exclusive data lock.
    async fn discard(&self, ranges: &[BlockRange]) {
        if !self.meta.may_write() {
            return;
        }
        for r in ranges {
            if let Err(e) = self.lun.discard(r.start * self.bs, r.len * self.bs).await {
                tracing::debug!(error = %e, start = r.start, len = r.len, "discard failed");
            }
        }
    }
}

impl Shared {
    /// Takes the exclusive lock of a file whose last link `op` removes, discards its
    /// blocks, applies `op`, and forgets the file.
    async fn remove_file(self: &Arc<Self>, ino: Ino, op: Op) -> VolumeResult<()> {
        let fs = self.file_ref(ino);
        let res = self.remove_file_locked(&fs, op).await;
        self.file_unref(&fs);
        res
    }

    async fn remove_file_locked(self: &Arc<Self>, fs: &Arc<FileState>, op: Op) -> VolumeResult<()> {
        let ino = fs.ino;
        let _w = fs.io.clone().write_owned().await;
        match self.ensure_lock_locked(fs, LockMode::Exclusive).await {
            Ok(()) => {}
            // Removed meanwhile: let the op report what it finds.
            Err(VolumeError::Stale(_)) => {
                self.meta.submit(op).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        // Commit first: then every block the file uses is in its committed map, and the
        // removal frees it (nothing stays stranded in this node's reservation).
        if let Err(e) = self.commit(fs).await {
            tracing::debug!(ino, error = %e, "commit before removal failed");
        }
        let (held, extents) = fs.take_for_removal();
        let ranges: Vec<BlockRange> = extents
            .iter()
            .map(|e| BlockRange {
                start: e.lun_block,
                len: e.len,
            })
            .collect();
        self.discard(&ranges).await;
        let res = self.meta.submit(op).await;
        if let Some(h) = held
            && let Err(e) = self.meta.release(h.session, &data_lock_key(ino)).await
        {
            tracing::warn!(ino, error = %e, "releasing the lock of a removed file failed");
        }
        res?;
        Ok(())
    }

    /// The file state of `ino`, counted as used until [`Self::file_unref`].
    pub(crate) fn file_ref(&self, ino: Ino) -> Arc<FileState> {
        let mut files = lock(&self.files);
        let fs = files
            .entry(ino)
            .or_insert_with(|| Arc::new(FileState::new(ino)))
            .clone();
        fs.add_ref();
        fs
    }

    /// Ends a use of a file state; the last one commits, releases the data lock and
    /// forgets the file (in the background).
    pub(crate) fn file_unref(self: &Arc<Self>, fs: &Arc<FileState>) {
        if fs.drop_ref() == 0 {
            let shared = Arc::downgrade(self);
            let fs = fs.clone();
            self.rt.spawn(async move {
                if let Some(shared) = shared.upgrade() {
                    shared.retire(fs).await;
                }
            });
        }
    }

    async fn retire(self: Arc<Self>, fs: Arc<FileState>) {
        if fs.refs() > 0 {
            return;
        }
        if let Err(e) = self.give_up(&fs).await {
            tracing::warn!(ino = fs.ino, error = %e, "write-back on last close failed");
        }
        let mut files = lock(&self.files);
        if fs.refs() == 0
            && !fs.holds_lock()
            && files.get(&fs.ino).is_some_and(|f| Arc::ptr_eq(f, &fs))
        {
            files.remove(&fs.ino);
        }
    }
}

/// A weak handle for background tasks.
pub(crate) type WeakShared = Weak<Shared>;
