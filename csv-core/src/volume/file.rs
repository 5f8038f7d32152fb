//! Per-file state on this node ([`FileState`]), open files ([`OpenFile`]) and the data
//! path: reads, the ordered write path, commits, truncate, fallocate, SEEK_DATA/HOLE,
//! and the data lock life cycle (acquire, break, release).
//!
//! Concurrency: `io` is a read/write lock. Reads, writes, commits and fsyncs hold it
//! shared, so they run in parallel; taking, breaking and releasing the data lock, and
//! operations that change the extent map wholesale (truncate, fallocate, removal), hold
//! it exclusively, so the data lock never changes under an I/O in flight. Writes that
//! allocate, convert unwritten blocks or read-modify-write a partial LUN sector also take
//! `write_serial`, so two of them never race on one block; aligned overwrites of written
//! extents go straight to the LUN in parallel. `core` (a plain mutex) is only held for
//! short, await-free sections.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedRwLockReadGuard, RwLock, broadcast};

use super::extents::{ExtentMap, Run, RunKind};
use super::reserve::Placement;
use super::{
    Applied, Consistency, MetaAnswer, MetaClientError, MetaQuery, Shared, VolumeError,
    VolumeResult, WeakShared, answer, lock, now,
};
use crate::lun::{Cached, IoFence, ZeroCopy};

/// How long a write waits for a lapsed lease to come back before it fails as fenced.
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How often a waiting write looks at the lease again.
const LEASE_POLL: std::time::Duration = std::time::Duration::from_millis(10);
use crate::meta::{
    Attr, BlockRange, Extent, ExtentState, FallocMode, FencingToken, Ino, LockMode, MAX_FILE_SIZE,
    MetaError, SessionId, data_lock_key,
};
use crate::op::{Op, Response};

/// A data lock this node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    pub mode: LockMode,
    pub token: FencingToken,
    pub session: SessionId,
}

#[derive(Debug, Default)]
struct Core {
    lock: Option<Held>,
    /// Committed extents overlaid with `pending` (valid while `lock` is held).
    map: ExtentMap,
    /// Extents written to the LUN but not committed yet.
    pending: ExtentMap,
    /// The size this node sees (committed size, or more with pending writes).
    size: u64,
    committed_size: u64,
    /// The last committed attributes (valid while `lock` is held).
    attr: Option<Attr>,
    /// Data was written since the last commit (mtime to record).
    dirty: bool,
    commit_scheduled: bool,
    /// A failed write-back, reported by the next fsync/flush.
    error: bool,
    /// LUN writes since the last flush (fsync must flush).
    unflushed: bool,
    last_break: Option<Instant>,
}

/// This node's state of one file (shared by all its open handles).
pub(crate) struct FileState {
    pub ino: Ino,
    core: Mutex<Core>,
    pub io: Arc<RwLock<()>>,
    write_serial: tokio::sync::Mutex<()>,
    commit_serial: tokio::sync::Mutex<()>,
    refs: AtomicUsize,
}

impl FileState {
    /// The credentials a LUN write of this file carries (the redirector sends them to
    /// the peer, which refuses a stale token): the exclusive data lock's grant.
    pub fn fence(&self) -> Option<IoFence> {
        let c = lock(&self.core);
        c.lock
            .filter(|h| h.mode == LockMode::Exclusive)
            .map(|h| IoFence {
                key: data_lock_key(self.ino),
                token: h.token,
            })
    }

    pub fn new(ino: Ino) -> Self {
        FileState {
            ino,
            core: Mutex::new(Core::default()),
            io: Arc::new(RwLock::new(())),
            write_serial: tokio::sync::Mutex::new(()),
            commit_serial: tokio::sync::Mutex::new(()),
            refs: AtomicUsize::new(0),
        }
    }

    pub fn add_ref(&self) {
        self.refs.fetch_add(1, Ordering::SeqCst);
    }

    /// Returns the remaining count.
    pub fn drop_ref(&self) -> usize {
        self.refs.fetch_sub(1, Ordering::SeqCst).saturating_sub(1)
    }

    pub fn refs(&self) -> usize {
        self.refs.load(Ordering::SeqCst)
    }

    pub fn holds_lock(&self) -> bool {
        lock(&self.core).lock.is_some()
    }

    /// (size, allocated blocks) as this node sees them, while it holds the data lock.
    pub fn local_size(&self) -> Option<(u64, u64)> {
        let c = lock(&self.core);
        c.lock?;
        Some((c.size, c.map.iter().map(|e| e.len).sum()))
    }

    /// For removal (after a commit): the lock and every mapped extent; the state is reset.
    pub fn take_for_removal(&self) -> (Option<Held>, Vec<Extent>) {
        let mut c = lock(&self.core);
        let held = c.lock.take();
        let extents: Vec<Extent> = c.map.iter().copied().collect();
        *c = Core {
            last_break: c.last_break,
            ..Core::default()
        };
        (held, extents)
    }

    fn lock_ok(&self, want: LockMode, session: Option<SessionId>) -> bool {
        let c = lock(&self.core);
        match c.lock {
            Some(h) if Some(h.session) == session => {
                want == LockMode::Shared || h.mode == LockMode::Exclusive
            }
            _ => false,
        }
    }
}

/// An open regular file on this node. Dropping it without [`OpenFile::release`] still
/// ends its use of the file (write-back then happens in the background).
///
/// **Write revocation** (for the NBD live-migration handoff): a handle normally takes the
/// file's exclusive data lock again on its next write after another node broke it (the
/// coherent "ping-pong" FUSE relies on). After [`OpenFile::revoke_writes`], this handle
/// never does: its writes, `fallocate` and `set_len` fail with
/// [`VolumeError::WriteRevoked`] without touching the lock, while reads and `fsync` keep
/// working. The check sits inside the lock-acquisition loop, under the `io` guard, so a
/// write already waiting when the handle is revoked cannot re-acquire the lock either.
/// [`OpenFile::surrender`] then commits and gives the lock up on the spot.
pub struct OpenFile {
    shared: Arc<Shared>,
    fs: Arc<FileState>,
    writable: bool,
    released: bool,
    revoked: AtomicBool,
}

impl std::fmt::Debug for OpenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenFile")
            .field("ino", &self.fs.ino)
            .field("writable", &self.writable)
            .finish()
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        if !self.released {
            self.released = true;
            self.shared.file_unref(&self.fs);
        }
    }
}

impl OpenFile {
    pub(crate) fn new(shared: Arc<Shared>, fs: Arc<FileState>, writable: bool) -> Self {
        OpenFile {
            shared,
            fs,
            writable,
            released: false,
            revoked: AtomicBool::new(false),
        }
    }

    fn check_writable(&self) -> VolumeResult<()> {
        if !self.writable {
            return Err(VolumeError::Invalid("file not open for writing".into()));
        }
        if self.writes_revoked() {
            return Err(VolumeError::WriteRevoked(self.fs.ino));
        }
        Ok(())
    }

    /// From now on, writes through this handle fail with [`VolumeError::WriteRevoked`]
    /// and never take the data lock again (see the type docs). Irreversible.
    pub fn revoke_writes(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }

    pub fn writes_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    /// Takes the file's exclusive data lock now (if this node does not hold it yet,
    /// asking the holder to break it) and returns its fencing token.
    pub async fn lock_for_write(&self) -> VolumeResult<FencingToken> {
        self.check_writable()?;
        let _g = self
            .shared
            .io_guard(&self.fs, LockMode::Exclusive, Some(&self.revoked))
            .await?;
        lock(&self.fs.core)
            .lock
            .map(|h| h.token)
            .ok_or(VolumeError::WriteRevoked(self.fs.ino))
    }

    /// The fencing token of this node's exclusive data lock on the file, if it holds one.
    pub fn write_token(&self) -> Option<FencingToken> {
        let c = lock(&self.fs.core);
        c.lock
            .filter(|h| {
                h.mode == LockMode::Exclusive && Some(h.session) == self.shared.meta.session()
            })
            .map(|h| h.token)
    }

    /// Commits every pending write of the file on this node, flushes the LUN and releases
    /// this node's data lock now, after the I/O in flight finished. Other handles on this
    /// node take the lock again on demand (a revoked one never does). The error, if any,
    /// is the write-back's: data written since the last fsync may be lost.
    pub async fn surrender(&self) -> VolumeResult<()> {
        let _w = self.fs.io.clone().write_owned().await;
        let res = self.shared.commit(&self.fs).await;
        self.shared.break_locked(&self.fs).await;
        let error = std::mem::take(&mut lock(&self.fs.core).error);
        res?;
        if error {
            return Err(VolumeError::WriteBack(self.fs.ino));
        }
        Ok(())
    }

    /// Truncates or extends (with zeros) the file to `size` bytes.
    pub async fn set_len(&self, size: u64) -> VolumeResult<Attr> {
        self.check_writable()?;
        if size > MAX_FILE_SIZE {
            return Err(VolumeError::Meta(MetaError::FileTooBig));
        }
        self.shared
            .truncate_ref(&self.fs, size, Some(&self.revoked))
            .await
    }

    pub fn ino(&self) -> Ino {
        self.fs.ino
    }

    /// Reads up to `len` bytes at `offset` (short at end of file).
    pub async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        let _g = self
            .shared
            .io_guard(&self.fs, LockMode::Shared, None)
            .await?;
        self.shared.read_locked(&self.fs, offset, len).await
    }

    /// Takes `len` bytes at `offset` without copying them, spliced into a pipe or viewed in
    /// a mapping of the LUN as `how` says (see [`crate::lun::zerocopy`]): only when the range
    /// lies inside the file and in one written extent, the LUN is read directly, and every
    /// byte is in this node's page cache. `None`: read with [`OpenFile::read`].
    pub async fn read_cached(
        &self,
        offset: u64,
        len: usize,
        how: ZeroCopy,
    ) -> VolumeResult<Option<Cached>> {
        let _g = self
            .shared
            .io_guard(&self.fs, LockMode::Shared, None)
            .await?;
        Ok(self.shared.read_cached_locked(&self.fs, offset, len, how))
    }

    /// Writes all of `data` at `offset`; returns the byte count.
    pub async fn write(&self, offset: u64, data: Bytes) -> VolumeResult<usize> {
        self.check_writable()?;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(VolumeError::Meta(MetaError::FileTooBig))?;
        if data.is_empty() {
            return Ok(0);
        }
        let _g = self
            .shared
            .io_guard(&self.fs, LockMode::Exclusive, Some(&self.revoked))
            .await?;
        self.shared.write_locked(&self.fs, offset, end, data).await
    }

    /// Makes every write so far durable and visible to other nodes (fsync, FLUSH).
    pub async fn fsync(&self) -> VolumeResult<()> {
        self.shared.fsync(&self.fs).await
    }

    /// `fallocate(2)` over `[offset, offset + len)`.
    pub async fn fallocate(&self, offset: u64, len: u64, mode: FallocMode) -> VolumeResult<Attr> {
        self.check_writable()?;
        self.shared
            .fallocate(&self.fs, offset, len, mode, Some(&self.revoked))
            .await
    }

    /// `lseek(SEEK_DATA)`: the first data byte at or after `offset`; `None` = ENXIO.
    pub async fn seek_data(&self, offset: u64) -> VolumeResult<Option<u64>> {
        self.seek(offset, true).await
    }

    /// `lseek(SEEK_HOLE)`: the first hole byte at or after `offset` (the size counts as
    /// a hole); `None` = ENXIO.
    pub async fn seek_hole(&self, offset: u64) -> VolumeResult<Option<u64>> {
        self.seek(offset, false).await
    }

    async fn seek(&self, offset: u64, data: bool) -> VolumeResult<Option<u64>> {
        let _g = self
            .shared
            .io_guard(&self.fs, LockMode::Shared, None)
            .await?;
        let bs = self.shared.bs;
        let c = lock(&self.fs.core);
        if offset >= c.size {
            return Ok(None);
        }
        let fb = offset / bs;
        if data {
            Ok(c.map
                .next_data(fb)
                .map(|b| (b * bs).max(offset))
                .filter(|p| *p < c.size))
        } else {
            Ok(Some((c.map.next_hole(fb) * bs).max(offset).min(c.size)))
        }
    }

    /// Ends this handle (the last handle of a file on this node commits and releases
    /// the data lock in the background).
    pub fn release(mut self) {
        self.released = true;
        self.shared.file_unref(&self.fs);
    }
}

impl Shared {
    /// Waits until this node holds the file's data lock in (at least) `mode` and returns
    /// a shared `io` guard under which the lock cannot change. With `revoked` set, fails
    /// instead of (re-)acquiring the lock.
    async fn io_guard(
        &self,
        fs: &Arc<FileState>,
        mode: LockMode,
        revoked: Option<&AtomicBool>,
    ) -> VolumeResult<OwnedRwLockReadGuard<()>> {
        loop {
            self.wait_session().await;
            let g = fs.io.clone().read_owned().await;
            if fs.lock_ok(mode, self.meta.session()) {
                return Ok(g);
            }
            drop(g);
            let _w = fs.io.clone().write_owned().await;
            check_revoked(fs, revoked)?;
            self.ensure_lock_locked(fs, mode).await?;
        }
    }

    /// Takes the data lock in `mode` if not held; the caller holds `io` exclusively.
    pub(crate) async fn ensure_lock_locked(
        &self,
        fs: &Arc<FileState>,
        mode: LockMode,
    ) -> VolumeResult<()> {
        let session = self.meta.session();
        if fs.lock_ok(mode, session) {
            return Ok(());
        }
        let holdoff = {
            let mut c = lock(&fs.core);
            if let Some(h) = c.lock
                && Some(h.session) != session
            {
                // The lease was lost: the lock and the reservation behind pending
                // writes are gone with it.
                if !c.pending.is_empty() || c.dirty {
                    c.error = true;
                }
                let last_break = c.last_break;
                let error = c.error;
                *c = Core {
                    last_break,
                    error,
                    ..Core::default()
                };
            }
            c.last_break
                .map(|t| (t + self.cfg.break_holdoff).saturating_duration_since(Instant::now()))
        };
        if let Some(d) = holdoff
            && !d.is_zero()
        {
            tokio::time::sleep(d).await;
        }
        let key = data_lock_key(fs.ino);
        let deadline = Instant::now() + self.cfg.lock_wait;
        loop {
            match self.meta.acquire(&key, mode).await {
                Ok((token, session)) => {
                    return self
                        .load_locked(
                            fs,
                            Held {
                                mode,
                                token,
                                session,
                            },
                        )
                        .await;
                }
                Err(MetaClientError::Meta(MetaError::LockBusy { .. })) => {
                    if Instant::now() >= deadline {
                        return Err(VolumeError::LockTimeout(key));
                    }
                    self.meta.request_break(&key).await?;
                    self.wait_released(fs, &key, mode).await?;
                }
                // No valid lease: fail now (self-fenced), never wait for one.
                Err(MetaClientError::NoSession) => return Err(VolumeError::Fenced),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Polls (briefly) until `key` could be granted in `mode`. If another node asked for
    /// a lock this node holds meanwhile (both want to upgrade), gives ours up first.
    async fn wait_released(
        &self,
        fs: &Arc<FileState>,
        key: &str,
        mode: LockMode,
    ) -> VolumeResult<()> {
        let me = self.meta.node_id();
        for _ in 0..40 {
            let info = self.meta.lock_info(key, Consistency::Replica).await?;
            let session = self.meta.session();
            let Some(info) = info else { return Ok(()) };
            let others: Vec<_> = info
                .holders
                .iter()
                .filter(|h| Some(h.session) != session)
                .collect();
            let compatible = match mode {
                LockMode::Shared => others.iter().all(|h| h.mode == LockMode::Shared),
                LockMode::Exclusive => others.is_empty(),
            };
            if compatible {
                return Ok(());
            }
            if info.break_requested_by.is_some_and(|n| n != me) && fs.holds_lock() {
                self.break_locked(fs).await;
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// After a grant: loads fresh attributes and extents (linearizable, so every commit
    /// of the previous holder is seen).
    async fn load_locked(&self, fs: &Arc<FileState>, held: Held) -> VolumeResult<()> {
        let key = data_lock_key(fs.ino);
        let loaded = async {
            let attr = self.getattr(fs.ino, Consistency::Linearizable).await?;
            let extents = answer!(
                self.meta
                    .query(
                        MetaQuery::Extents {
                            ino: fs.ino,
                            first_block: 0,
                            nblocks: u64::MAX,
                        },
                        Consistency::Linearizable,
                    )
                    .await?,
                Extents
            )?;
            Ok::<_, VolumeError>((attr, extents))
        }
        .await;
        let (attr, extents) = match loaded {
            Ok(x) => x,
            Err(e) => {
                let _ = self.meta.release(held.session, &key).await;
                return Err(match e {
                    VolumeError::Meta(MetaError::NotFound) => VolumeError::Stale(fs.ino),
                    e => e,
                });
            }
        };
        let mut c = lock(&fs.core);
        // Pending writes survive only an upgrade (same session, already exclusive: none).
        let pending = std::mem::take(&mut c.pending);
        let mut map = ExtentMap::from_extents(extents);
        for e in pending.iter() {
            map.insert(*e);
        }
        c.size = c.size.max(attr.size);
        if pending.is_empty() {
            c.size = attr.size;
        }
        c.pending = pending;
        c.committed_size = attr.size;
        c.map = map;
        c.attr = Some(attr);
        c.lock = Some(held);
        Ok(())
    }

    /// Gives the data lock up: commits pending writes, flushes, releases, drops the
    /// cache. The caller holds `io` exclusively.
    pub(crate) async fn break_locked(&self, fs: &Arc<FileState>) {
        let held = lock(&fs.core).lock;
        let Some(held) = held else { return };
        if held.mode == LockMode::Exclusive {
            if let Err(e) = self.commit(fs).await {
                tracing::warn!(ino = fs.ino, error = %e, "write-back before a lock break failed");
            }
            // Settle, not just flush: a write of ours with an unknown outcome (a ghost on a
            // hung path) must not land after the next owner's writes. If it cannot settle,
            // keep the lock: the next owner waits (a stall), nothing is rolled back.
            if self.meta.may_write()
                && let Err(e) = self.lun.settle().await
            {
                tracing::warn!(ino = fs.ino, error = %e, "LUN not settled; keeping the data lock");
                return;
            }
        }
        if let Err(e) = self
            .meta
            .release(held.session, &data_lock_key(fs.ino))
            .await
        {
            tracing::warn!(ino = fs.ino, error = %e, "releasing a data lock failed");
        }
        let mut c = lock(&fs.core);
        let error = c.error;
        *c = Core {
            last_break: Some(Instant::now()),
            error,
            ..Core::default()
        };
    }

    /// Commits and releases (last close, shutdown).
    pub(crate) async fn give_up(&self, fs: &Arc<FileState>) -> VolumeResult<()> {
        let _w = fs.io.clone().write_owned().await;
        let res = self.commit(fs).await;
        self.break_locked(fs).await;
        lock(&fs.core).last_break = None;
        res
    }

    // ---- reads --------------------------------------------------------------------------

    async fn read_locked(
        &self,
        fs: &Arc<FileState>,
        offset: u64,
        len: usize,
    ) -> VolumeResult<Bytes> {
        let bs = self.bs;
        let (size, runs) = {
            let c = lock(&fs.core);
            if offset >= c.size || len == 0 {
                return Ok(Bytes::new());
            }
            let end = c.size.min(offset + len as u64);
            (end, c.map.runs(offset / bs, end.div_ceil(bs)))
        };
        let end = size;
        // One written extent covers the whole read (the common case): no staging copy.
        if let Some(lun_off) = in_one_written_run(&runs, bs, offset, end) {
            return self.lun_read(lun_off, (end - offset) as usize).await;
        }
        let mut buf = BytesMut::zeroed((end - offset) as usize);
        for run in runs {
            let RunKind::Mapped {
                lun_block,
                state: ExtentState::Written,
            } = run.kind
            else {
                continue;
            };
            let r0 = (run.file_block * bs).max(offset);
            let r1 = ((run.file_block + run.len) * bs).min(end);
            let lun_off = lun_block * bs + (r0 - run.file_block * bs);
            let data = self.lun_read(lun_off, (r1 - r0) as usize).await?;
            buf[(r0 - offset) as usize..(r1 - offset) as usize].copy_from_slice(&data);
        }
        Ok(buf.freeze())
    }

    /// See [`OpenFile::read_cached`]; the caller holds the file's I/O guard.
    fn read_cached_locked(
        &self,
        fs: &Arc<FileState>,
        offset: u64,
        len: usize,
        how: ZeroCopy,
    ) -> Option<Cached> {
        let end = offset.checked_add(len as u64)?;
        let runs = {
            let c = lock(&fs.core);
            if len == 0 || end > c.size {
                return None;
            }
            c.map.runs(offset / self.bs, end.div_ceil(self.bs))
        };
        let lun_off = in_one_written_run(&runs, self.bs, offset, end)?;
        self.lun.read_cached(lun_off, len, how)
    }

    /// Reads `len` bytes at LUN byte `off`, widening to the LUN's alignment.
    async fn lun_read(&self, off: u64, len: usize) -> VolumeResult<Bytes> {
        let a = self.align;
        let start = off / a * a;
        let end = (off + len as u64).div_ceil(a) * a;
        let data = self.lun.read_at(start, (end - start) as usize).await?;
        let skip = (off - start) as usize;
        Ok(data.slice(skip..skip + len))
    }

    /// Waits (up to [`LEASE_WAIT`]) while this node has no valid lease; whoever then
    /// finds none fails as before.
    async fn wait_session(&self) {
        let deadline = Instant::now() + LEASE_WAIT;
        while self.meta.session().is_none() && Instant::now() < deadline {
            tokio::time::sleep(LEASE_POLL).await;
        }
    }

    /// Returns once this node may write under `fs`'s data lock: its lease is valid and, if
    /// it holds the lock, under the session that took it. A lapsed lease (a keep-alive held
    /// up by a pause or a leader change) is waited for, up to [`LEASE_WAIT`], so that I/O
    /// rides out the gap instead of failing; a new session means the lock is gone: fenced
    /// at once. (The lease, not the wait, is the safety: no LUN write is issued without it.)
    async fn lease_for(&self, fs: &FileState) -> VolumeResult<()> {
        let held = lock(&fs.core).lock.map(|h| h.session);
        self.wait_session().await;
        match (self.meta.session(), held) {
            (Some(s), Some(h)) if s != h => Err(VolumeError::Fenced),
            (Some(_), _) => Ok(()),
            (None, _) => Err(VolumeError::Fenced),
        }
    }

    /// Writes `data` at LUN byte `off`, read-modify-writing partial sectors. Callers
    /// serialize writes that touch a partial sector.
    async fn lun_write(&self, fs: &FileState, off: u64, data: Bytes) -> VolumeResult<()> {
        self.lease_for(fs).await?;
        let fence = fs.fence();
        let a = self.align;
        let end = off + data.len() as u64;
        if off.is_multiple_of(a) && end.is_multiple_of(a) {
            self.lun.write_fenced(off, data, false, fence).await?;
            return Ok(());
        }
        let start = off / a * a;
        let aend = end.div_ceil(a) * a;
        let mut buf = BytesMut::zeroed((aend - start) as usize);
        // Only the partial head and tail sectors need their old content.
        let head = self.lun.read_at(start, a as usize).await?;
        buf[..a as usize].copy_from_slice(&head);
        if aend - a > start {
            let tail = self.lun.read_at(aend - a, a as usize).await?;
            let n = buf.len();
            buf[n - a as usize..].copy_from_slice(&tail);
        }
        let skip = (off - start) as usize;
        buf[skip..skip + data.len()].copy_from_slice(&data);
        self.lease_for(fs).await?;
        self.lun
            .write_fenced(start, buf.freeze(), false, fence)
            .await?;
        Ok(())
    }

    // ---- writes -------------------------------------------------------------------------

    async fn write_locked(
        &self,
        fs: &Arc<FileState>,
        offset: u64,
        end: u64,
        data: Bytes,
    ) -> VolumeResult<usize> {
        let bs = self.bs;
        let (first, last) = (offset / bs, end.div_ceil(bs));
        let aligned = offset.is_multiple_of(self.align) && end.is_multiple_of(self.align);
        let (fast, runs) = {
            let mut c = lock(&fs.core);
            let runs = c.map.runs(first, last);
            let fast = aligned
                && runs.iter().all(|r| {
                    matches!(
                        r.kind,
                        RunKind::Mapped {
                            state: ExtentState::Written,
                            ..
                        }
                    )
                });
            if fast {
                c.unflushed = true;
            }
            (fast, runs)
        };
        // Written extents keep their mapping under the shared `io` guard (only `io`-exclusive
        // operations remap them), so the fast path may use the runs it just checked; the
        // others look again under `write_serial`.
        let (_serial, runs) = if fast {
            (None, runs)
        } else {
            let g = fs.write_serial.lock().await;
            (Some(g), lock(&fs.core).map.runs(first, last))
        };
        let holes: u64 = runs
            .iter()
            .filter(|r| r.kind == RunKind::Hole)
            .map(|r| r.len)
            .sum();
        let mut fresh = if holes > 0 {
            let first_hole = runs.iter().find(|r| r.kind == RunKind::Hole);
            self.take_blocks(holes, first_hole.map(|r| r.file_block))
                .await?
        } else {
            Vec::new()
        };
        let session = self.meta.session();
        if !fast {
            lock(&fs.core).unflushed = true;
        }
        let result = self
            .write_runs(fs, offset, end, &data, &runs, &mut fresh)
            .await;
        if !fresh.is_empty()
            && let Some(s) = session
        {
            lock(&self.reserve).give_back(s, &fresh);
        }
        result?;
        let schedule = {
            let mut c = lock(&fs.core);
            c.size = c.size.max(end);
            c.dirty = true;
            let need = !c.pending.is_empty() || c.size > c.committed_size;
            let schedule = need && !c.commit_scheduled;
            if schedule {
                c.commit_scheduled = true;
            }
            schedule
        };
        if schedule {
            self.schedule_commit(fs);
        }
        Ok(data.len())
    }

    /// Writes each run of the range; new blocks come from `fresh` (consumed from the
    /// front; what is left is returned to the pool by the caller).
    async fn write_runs(
        &self,
        fs: &Arc<FileState>,
        offset: u64,
        end: u64,
        data: &Bytes,
        runs: &[super::extents::Run],
        fresh: &mut Vec<BlockRange>,
    ) -> VolumeResult<()> {
        let bs = self.bs;
        for run in runs {
            let rb0 = run.file_block * bs;
            let rb1 = (run.file_block + run.len) * bs;
            let d0 = rb0.max(offset);
            let d1 = rb1.min(end);
            let part = data.slice((d0 - offset) as usize..(d1 - offset) as usize);
            match run.kind {
                RunKind::Mapped {
                    lun_block,
                    state: ExtentState::Written,
                } => {
                    self.lun_write(fs, lun_block * bs + (d0 - rb0), part)
                        .await?;
                }
                RunKind::Mapped {
                    lun_block,
                    state: ExtentState::Unwritten,
                } => {
                    let buf = whole_blocks(rb0, rb1, d0, part);
                    self.lun_write(fs, lun_block * bs, buf).await?;
                    let e = Extent {
                        file_block: run.file_block,
                        lun_block,
                        len: run.len,
                        state: ExtentState::Written,
                    };
                    let mut c = lock(&fs.core);
                    c.map.insert(e);
                    c.pending.insert(e);
                }
                RunKind::Hole => {
                    let mut fb = run.file_block;
                    let run_end = run.file_block + run.len;
                    while fb < run_end {
                        let Some(r) = fresh.first_mut() else {
                            return Err(VolumeError::Meta(MetaError::NoSpace));
                        };
                        let n = r.len.min(run_end - fb);
                        let lun_block = r.start;
                        r.start += n;
                        r.len -= n;
                        if r.len == 0 {
                            fresh.remove(0);
                        }
                        let (p0, p1) = (fb * bs, (fb + n) * bs);
                        let (q0, q1) = (p0.max(offset), p1.min(end));
                        let piece = data.slice((q0 - offset) as usize..(q1 - offset) as usize);
                        let buf = whole_blocks(p0, p1, q0, piece);
                        if let Err(e) = self.lun_write(fs, lun_block * bs, buf).await {
                            fresh.insert(
                                0,
                                BlockRange {
                                    start: lun_block,
                                    len: n,
                                },
                            );
                            return Err(e);
                        }
                        let e = Extent {
                            file_block: fb,
                            lun_block,
                            len: n,
                            state: ExtentState::Written,
                        };
                        let mut c = lock(&fs.core);
                        c.map.insert(e);
                        c.pending.insert(e);
                        fb += n;
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes `n` blocks from this node's reservation, reserving more when needed. They go
    /// where file block `first` belongs (`VolumeConfig::placement_bytes`) if the
    /// reservation has room there, or gets it from one more chunk while it holds less than
    /// a chunk (a run of sequential writes reaching the end of its chunk); otherwise
    /// anywhere.
    async fn take_blocks(&self, n: u64, first: Option<u64>) -> VolumeResult<Vec<BlockRange>> {
        let unit = self.cfg.placement_bytes / self.bs;
        let place = first.filter(|_| unit > 1).map(|fb| Placement {
            unit,
            phase: fb % unit,
        });
        let chunk = (self.cfg.reserve_chunk_bytes / self.bs).max(1);
        // Until one refill was tried for it, a placed take takes placed blocks only.
        let mut placed_only = place.is_some();
        loop {
            let session = self.meta.session().ok_or(VolumeError::Fenced)?;
            let take = |placed_only: bool| {
                let mut pool = lock(&self.reserve);
                match place {
                    Some(p) if placed_only => pool.take_placed(session, n, p),
                    _ => pool.take(session, n, place),
                }
            };
            if let Some(r) = take(placed_only) {
                return Ok(r);
            }
            let _g = self.refill.lock().await;
            // Another writer may have refilled the pool meanwhile.
            if let Some(r) = take(placed_only) {
                return Ok(r);
            }
            let have = lock(&self.reserve).available(session);
            if have >= n && (!placed_only || have >= chunk) {
                placed_only = false;
                continue;
            }
            let want = n.saturating_sub(have).max(chunk);
            let reserved = self
                .meta
                .submit(Op::Reserve {
                    session,
                    blocks: want,
                })
                .await;
            placed_only = false;
            match reserved {
                Ok(Response::Reserved(ranges)) => lock(&self.reserve).add(session, &ranges),
                // Placement is a preference: without more space, what the pool holds will do.
                Err(_) if have >= n => {}
                Ok(other) => {
                    return Err(VolumeError::Unavailable(MetaClientError::Protocol(
                        format!("Reserve answered {other:?}"),
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    // ---- commits ------------------------------------------------------------------------

    fn schedule_commit(&self, fs: &Arc<FileState>) {
        let Some(me) = self.weak_self() else { return };
        let fs = fs.clone();
        let delay = self.cfg.commit_delay;
        self.rt.spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(shared) = me.upgrade() else { return };
            let _g = fs.io.clone().read_owned().await;
            lock(&fs.core).commit_scheduled = false;
            if let Err(e) = shared.commit(&fs).await {
                tracing::warn!(ino = fs.ino, error = %e, "background commit failed");
            }
        });
    }

    fn weak_self(&self) -> Option<WeakShared> {
        Some(self.me.clone())
    }

    /// Commits pending extents and size (step 3 of the write path): flushes the LUN,
    /// then `CommitWrite` with the fencing token. The caller keeps the lock stable.
    pub(crate) async fn commit(&self, fs: &Arc<FileState>) -> VolumeResult<()> {
        let _c = fs.commit_serial.lock().await;
        let (held, pending, size) = {
            let mut c = lock(&fs.core);
            if c.pending.is_empty() && c.size <= c.committed_size && !c.dirty {
                return Ok(());
            }
            let pending: Vec<Extent> = c.pending.iter().copied().collect();
            c.pending = ExtentMap::new();
            let size = (c.size > c.committed_size).then_some(c.size);
            c.dirty = false;
            (c.lock, pending, size)
        };
        let Some(held) = held.filter(|h| h.mode == LockMode::Exclusive) else {
            lock(&fs.core).error = true;
            return Err(VolumeError::WriteBack(fs.ino));
        };
        let res = async {
            self.lease_for(fs).await?;
            self.lun.flush().await?;
            let r = self
                .meta
                .submit(Op::CommitWrite {
                    session: held.session,
                    ino: fs.ino,
                    token: Some(held.token),
                    extents: pending,
                    size,
                    mtime: now(),
                })
                .await?;
            match r {
                Response::AttrFreed(a, _) | Response::Attr(a) => Ok(a),
                other => Err(VolumeError::Unavailable(MetaClientError::Protocol(
                    format!("CommitWrite answered {other:?}"),
                ))),
            }
        }
        .await;
        let mut c = lock(&fs.core);
        match res {
            Ok(attr) => {
                c.committed_size = c.committed_size.max(attr.size);
                c.attr = Some(attr);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(ino = fs.ino, error = %e, "commit failed: pending writes lost");
                c.error = true;
                Err(e)
            }
        }
    }

    async fn fsync(&self, fs: &Arc<FileState>) -> VolumeResult<()> {
        let _g = fs.io.clone().read_owned().await;
        let res = if lock(&fs.core).lock.is_some() {
            self.commit(fs).await
        } else {
            Ok(())
        };
        let (error, unflushed) = {
            let mut c = lock(&fs.core);
            (
                std::mem::take(&mut c.error),
                std::mem::take(&mut c.unflushed),
            )
        };
        if error {
            return Err(VolumeError::WriteBack(fs.ino));
        }
        res?;
        if unflushed
            && self.meta.may_write()
            && let Err(e) = self.lun.flush().await
        {
            lock(&fs.core).unflushed = true;
            return Err(e.into());
        }
        Ok(())
    }

    // ---- truncate and fallocate ------------------------------------------------------------

    /// Holds `io` exclusively with the exclusive data lock; commits pending writes.
    async fn exclusive(
        &self,
        fs: &Arc<FileState>,
        revoked: Option<&AtomicBool>,
    ) -> VolumeResult<tokio::sync::OwnedRwLockWriteGuard<()>> {
        let w = fs.io.clone().write_owned().await;
        check_revoked(fs, revoked)?;
        self.ensure_lock_locked(fs, LockMode::Exclusive).await?;
        self.commit(fs).await?;
        Ok(w)
    }

    pub(crate) async fn truncate(self: &Arc<Self>, ino: Ino, size: u64) -> VolumeResult<Attr> {
        if size > MAX_FILE_SIZE {
            return Err(VolumeError::Meta(MetaError::FileTooBig));
        }
        let fs = self.file_ref(ino);
        let res = self.truncate_ref(&fs, size, None).await;
        self.file_unref(&fs);
        res
    }

    async fn truncate_ref(
        &self,
        fs: &Arc<FileState>,
        size: u64,
        revoked: Option<&AtomicBool>,
    ) -> VolumeResult<Attr> {
        let _w = self.exclusive(fs, revoked).await?;
        let bs = self.bs;
        let old = lock(&fs.core).size;
        let mut zeroed = false;
        if size < old {
            let keep = size.div_ceil(bs);
            let gone: Vec<BlockRange> = lock(&fs.core)
                .map
                .overlapping(keep, u64::MAX)
                .iter()
                .map(|e| {
                    let skip = keep.saturating_sub(e.file_block);
                    BlockRange {
                        start: e.lun_block + skip,
                        len: e.len - skip,
                    }
                })
                .collect();
            self.discard(&gone).await;
            if !size.is_multiple_of(bs) {
                zeroed |= self.zero_written(fs, size, size.div_ceil(bs) * bs).await?;
            }
        } else if size > old && !old.is_multiple_of(bs) {
            zeroed |= self.zero_written(fs, old, old.div_ceil(bs) * bs).await?;
        }
        if zeroed {
            self.lun.flush().await?;
        }
        let r = self
            .meta
            .submit(Op::SetAttr {
                ino: fs.ino,
                perm: None,
                uid: None,
                gid: None,
                size: Some(size),
                atime: None,
                mtime: None,
            })
            .await?;
        let attr = match r {
            Response::AttrFreed(a, _) | Response::Attr(a) => a,
            other => {
                return Err(VolumeError::Unavailable(MetaClientError::Protocol(
                    format!("SetAttr answered {other:?}"),
                )));
            }
        };
        let mut c = lock(&fs.core);
        c.map.cut(size.div_ceil(bs), u64::MAX);
        c.size = attr.size;
        c.committed_size = attr.size;
        c.attr = Some(attr.clone());
        Ok(attr)
    }

    /// Writes zeros over the written parts of byte range `[from, to)` (inside one
    /// block's worth of written runs); returns whether anything was written.
    async fn zero_written(&self, fs: &Arc<FileState>, from: u64, to: u64) -> VolumeResult<bool> {
        if from >= to {
            return Ok(false);
        }
        let bs = self.bs;
        let runs = lock(&fs.core).map.runs(from / bs, to.div_ceil(bs));
        let mut any = false;
        for run in runs {
            if let RunKind::Mapped {
                lun_block,
                state: ExtentState::Written,
            } = run.kind
            {
                let r0 = (run.file_block * bs).max(from);
                let r1 = ((run.file_block + run.len) * bs).min(to);
                let zeros = Bytes::from(vec![0u8; (r1 - r0) as usize]);
                self.lun_write(fs, lun_block * bs + (r0 - run.file_block * bs), zeros)
                    .await?;
                any = true;
            }
        }
        Ok(any)
    }

    async fn fallocate(
        &self,
        fs: &Arc<FileState>,
        offset: u64,
        len: u64,
        mode: FallocMode,
        revoked: Option<&AtomicBool>,
    ) -> VolumeResult<Attr> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(VolumeError::Meta(MetaError::FileTooBig))?;
        if len == 0 {
            return Err(VolumeError::Invalid("fallocate of 0 bytes".into()));
        }
        let _w = self.exclusive(fs, revoked).await?;
        let bs = self.bs;
        if matches!(mode, FallocMode::PunchHole | FallocMode::ZeroRange { .. }) {
            let (inner0, inner1) = (offset.div_ceil(bs), end / bs);
            let mut zeroed = false;
            if inner0 >= inner1 {
                zeroed |= self.zero_written(fs, offset, end).await?;
            } else {
                zeroed |= self.zero_written(fs, offset, inner0 * bs).await?;
                zeroed |= self.zero_written(fs, inner1 * bs, end).await?;
                let inner: Vec<BlockRange> = lock(&fs.core)
                    .map
                    .runs(inner0, inner1)
                    .iter()
                    .filter_map(|r| match r.kind {
                        RunKind::Mapped { lun_block, .. } => Some(BlockRange {
                            start: lun_block,
                            len: r.len,
                        }),
                        RunKind::Hole => None,
                    })
                    .collect();
                self.discard(&inner).await;
            }
            if zeroed {
                self.lun.flush().await?;
            }
        }
        let r = self
            .meta
            .submit(Op::Fallocate {
                ino: fs.ino,
                offset,
                len,
                mode,
            })
            .await?;
        let attr = match r {
            Response::AttrFreed(a, _) | Response::Attr(a) => a,
            other => {
                return Err(VolumeError::Unavailable(MetaClientError::Protocol(
                    format!("Fallocate answered {other:?}"),
                )));
            }
        };
        let extents = answer!(
            self.meta
                .query(
                    MetaQuery::Extents {
                        ino: fs.ino,
                        first_block: 0,
                        nblocks: u64::MAX,
                    },
                    Consistency::Local,
                )
                .await?,
            Extents
        )?;
        let mut c = lock(&fs.core);
        c.map = ExtentMap::from_extents(extents);
        c.size = attr.size;
        c.committed_size = attr.size;
        c.attr = Some(attr.clone());
        Ok(attr)
    }
}

/// Fails with `WriteRevoked` when the handle's writes were revoked (checked right before
/// the lock would be taken).
fn check_revoked(fs: &FileState, revoked: Option<&AtomicBool>) -> VolumeResult<()> {
    if revoked.is_some_and(|r| r.load(Ordering::SeqCst)) {
        return Err(VolumeError::WriteRevoked(fs.ino));
    }
    Ok(())
}

/// Whole blocks `[b0, b1)` (bytes) with `data` at `d0` and zeros elsewhere.
fn whole_blocks(b0: u64, b1: u64, d0: u64, data: Bytes) -> Bytes {
    if d0 == b0 && data.len() as u64 == b1 - b0 {
        return data;
    }
    let mut buf = BytesMut::zeroed((b1 - b0) as usize);
    let skip = (d0 - b0) as usize;
    buf[skip..skip + data.len()].copy_from_slice(&data);
    buf.freeze()
}

/// The volume's background task: answers break requests for locks this node holds
/// (from the change feed, and by a periodic scan in case the feed lagged) and forgets
/// locks of a lost session.
pub(crate) async fn watch_breaks(shared: WeakShared, mut feed: broadcast::Receiver<Applied>) {
    let (interval, mut stop) = match shared.upgrade() {
        Some(s) => (s.cfg.scan_interval, s.stop.subscribe()),
        None => return,
    };
    // One timer for the whole loop: a sleep made anew each time round would never fire while
    // the feed delivers a commit more often than `interval` (any busy cluster), and breaks the
    // feed did not show (a follower brought up to date by a snapshot applies no single
    // commits) would then wait for a quiet moment.
    let mut scan_timer = tokio::time::interval(interval);
    scan_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    scan_timer.tick().await;
    loop {
        let mut candidates: Vec<Ino> = Vec::new();
        let mut scan = false;
        tokio::select! {
            msg = feed.recv() => match msg {
                Ok(a) => {
                    if let (Op::RequestBreak { key, .. }, Response::Ok) = (&a.op, &a.response)
                        && let Some(ino) = key.strip_prefix("data:").and_then(|s| s.parse().ok())
                    {
                        candidates.push(ino);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => scan = true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = scan_timer.tick() => scan = true,
            _ = stop.changed() => return,
        }
        let Some(s) = shared.upgrade() else { return };
        if scan {
            candidates = lock(&s.files)
                .iter()
                .filter(|(_, f)| f.holds_lock())
                .map(|(i, _)| *i)
                .collect();
        }
        for ino in candidates {
            let s2 = s.clone();
            let state = lock(&s.files).get(&ino).cloned();
            match state {
                // A scan looks only at files that hold a lock; a break request at any.
                Some(fs) if !scan || fs.holds_lock() => {
                    tokio::spawn(async move { s2.maybe_break(fs).await });
                }
                Some(_) => {}
                None if scan => {}
                None => {
                    // A break request names the file even where this node keeps no state of it:
                    // its session may still hold the lock (see `maybe_break`). Only then is a
                    // state made for the check. Every requester retries, so each request gets
                    // looked at again.
                    tokio::spawn(async move {
                        let held = matches!(
                            s2.meta.lock_info(&data_lock_key(ino), Consistency::Replica).await,
                            Ok(Some(info)) if info.holders.iter().any(|h| Some(h.session) == s2.meta.session())
                        );
                        if held {
                            let fs = s2.file_ref(ino);
                            s2.maybe_break(fs.clone()).await;
                            s2.file_unref(&fs);
                        }
                    });
                }
            }
        }
    }
}

impl Shared {
    /// Gives up `fs`'s lock if another node asked for it (or our session is gone).
    ///
    /// That includes a lock this node's session holds although no handle of this node took
    /// it: an acquisition whose answer was lost (its proposal timed out, then committed, as
    /// when a cut-off leader keeps its term through a short partition) or whose release
    /// failed. No operation of this node relies on such a lock (every one that takes the
    /// lock records it in the file's state under the exclusive `io` guard, where this check
    /// runs too), and until it is released every other node's I/O to the file waits for it.
    async fn maybe_break(&self, fs: Arc<FileState>) {
        let key = data_lock_key(fs.ino);
        let me = self.meta.node_id();
        let wanted = match self.meta.lock_info(&key, Consistency::Replica).await {
            Ok(Some(info)) => {
                info.break_requested_by.is_some_and(|n| n != me)
                    && info
                        .holders
                        .iter()
                        .any(|h| Some(h.session) == self.meta.session())
            }
            Ok(None) | Err(_) => false,
        };
        let session_gone = {
            let c = lock(&fs.core);
            c.lock
                .is_some_and(|h| Some(h.session) != self.meta.session())
        };
        if !wanted && !session_gone {
            return;
        }
        let _w = fs.io.clone().write_owned().await;
        if session_gone {
            let mut c = lock(&fs.core);
            if c.lock
                .is_some_and(|h| Some(h.session) != self.meta.session())
            {
                let error = c.error || !c.pending.is_empty() || c.dirty;
                *c = Core {
                    error,
                    ..Core::default()
                };
            }
            return;
        }
        // Re-check under the guard: the lock may have changed hands meanwhile.
        let still = matches!(
            self.meta.lock_info(&key, Consistency::Local).await,
            Ok(Some(info)) if info.break_requested_by.is_some_and(|n| n != me)
                && info.holders.iter().any(|h| Some(h.session) == self.meta.session())
        );
        if !still {
            return;
        }
        if fs.holds_lock() {
            tracing::debug!(ino = fs.ino, "giving up a data lock another node asked for");
            self.break_locked(&fs).await;
            return;
        }
        let Some(session) = self.meta.session() else {
            return;
        };
        tracing::warn!(
            ino = fs.ino,
            session,
            "releasing a data lock this node's session holds but none of its files took \
             (an acquisition whose answer was lost)"
        );
        if let Err(e) = self.meta.release(session, &key).await {
            tracing::warn!(ino = fs.ino, error = %e, "releasing a lost data lock failed");
        }
    }
}

/// The LUN byte holding file byte `offset` when `[offset, end)` lies inside one written
/// extent of `runs` (file blocks of `bs` bytes).
fn in_one_written_run(runs: &[Run], bs: u64, offset: u64, end: u64) -> Option<u64> {
    let [run] = runs else {
        return None;
    };
    let RunKind::Mapped {
        lun_block,
        state: ExtentState::Written,
    } = run.kind
    else {
        return None;
    };
    (run.file_block * bs <= offset && (run.file_block + run.len) * bs >= end)
        .then(|| lun_block * bs + (offset - run.file_block * bs))
}
