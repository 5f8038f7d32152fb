//! [`CsvFs`]: the `fuser::Filesystem` implementation. Each method decodes, spawns a task
//! that calls the volume, and replies from the task.
//!
//! Reads and writes take a faster road ([`CsvFs::serve_inline`]): the request thread polls
//! the volume future once itself, with LUN file I/O allowed inline ([`InlineIo`]). When
//! the data lock is held (the common case) the request completes there, without a
//! hand-off to the runtime and back; a future that must wait (lock acquisition, metadata
//! round trips, another backend) is handed to the runtime as a task, so a slow request
//! never parks the request thread.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use csv_core::lun::file::{InlineIo, copy_aligned};
use csv_core::meta::{Attr, DirEntry, FallocMode, FileKind, Timestamp};
use csv_core::volume::{AdvisoryKind, OpenFile, SetAttr, Volume, VolumeError};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, Notifier, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::MountOptions;
use crate::errno::{errno, inode_errno};

const MAX_WRITE: u32 = 1 << 20;
const DIR_BATCH: usize = 1024;

/// Where the notifier goes once the session exists (open() uses it).
#[derive(Clone, Default)]
pub struct NotifierSlot(Arc<OnceLock<Notifier>>);

impl NotifierSlot {
    pub fn set(&self, n: Notifier) {
        let _ = self.0.set(n);
    }
    fn get(&self) -> Option<&Notifier> {
        self.0.get()
    }
}

/// The FUSE filesystem over a [`Volume`].
pub struct CsvFs {
    vol: Volume,
    rt: tokio::runtime::Handle,
    ttl_entry: Duration,
    ttl_attr: Duration,
    files: Arc<Mutex<HashMap<u64, Arc<OpenFile>>>>,
    dirs: Arc<Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>>,
    next_fh: AtomicU64,
    notifier: NotifierSlot,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH
    }
}

fn stamp(t: TimeOrNow) -> Timestamp {
    match t {
        TimeOrNow::Now => csv_core::volume::now(),
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(_) => Timestamp::default(),
        },
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks * 8,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.crtime),
        kind: kind(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn name_str(name: &OsStr) -> Result<String, Errno> {
    name.to_str().map(str::to_string).ok_or(Errno::EINVAL)
}

fn open_flags() -> FopenFlags {
    FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
}

fn lock_end(end: u64) -> u64 {
    if end >= i64::MAX as u64 {
        u64::MAX
    } else {
        end
    }
}

macro_rules! try_reply {
    ($reply:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.error(e),
        }
    };
}

impl CsvFs {
    pub fn new(vol: Volume, rt: tokio::runtime::Handle, opts: MountOptions) -> Self {
        CsvFs {
            vol,
            rt,
            ttl_entry: opts.entry_ttl,
            ttl_attr: opts.attr_ttl,
            files: Arc::new(Mutex::new(HashMap::new())),
            dirs: Arc::new(Mutex::new(HashMap::new())),
            next_fh: AtomicU64::new(1),
            notifier: NotifierSlot::default(),
        }
    }

    pub fn notifier_slot(&self) -> NotifierSlot {
        self.notifier.clone()
    }

    /// Runs `fut` on this request thread until it first waits, with file I/O inline; the
    /// rest (if any) continues as a runtime task. The noop waker of the first poll is
    /// replaced by the task's waker at the task's first poll, per the `Future` contract.
    fn serve_inline(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut fut = Box::pin(fut);
        let pending = {
            let _rt = self.rt.enter();
            let _io = InlineIo::enter();
            fut.as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_pending()
        };
        if pending {
            self.rt.spawn(fut);
        }
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        lock(&self.files).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: FileKind,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let name = try_reply!(reply, name_str(name));
        let (uid, gid) = (req.uid(), req.gid());
        let perm = mode & !umask & 0o7777;
        let vol = self.vol.clone();
        let me = self.shallow();
        self.rt.spawn(async move {
            let r = vol
                .create(parent.0, &name, kind, perm, uid, gid, rdev)
                .await;
            me.entry_reply(reply, r);
        });
    }

    /// A copy of what tasks need to reply (TTLs).
    fn shallow(&self) -> Replier {
        Replier {
            ttl_entry: self.ttl_entry,
            ttl_attr: self.ttl_attr,
        }
    }
}

#[derive(Clone, Copy)]
struct Replier {
    ttl_entry: Duration,
    ttl_attr: Duration,
}

impl Replier {
    fn entry_reply(&self, reply: ReplyEntry, r: Result<Attr, VolumeError>) {
        match r {
            Ok(a) => reply.entry_with_ttls(
                &self.ttl_entry,
                &self.ttl_attr,
                &fattr(&a),
                Generation(a.generation),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }
    fn attr_reply(&self, reply: ReplyAttr, r: Result<Attr, VolumeError>) {
        match r {
            Ok(a) => reply.attr(&self.ttl_attr, &fattr(&a)),
            Err(e) => reply.error(inode_errno(&e)),
        }
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), VolumeError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

impl fuser::Filesystem for CsvFs {
    fn init(&mut self, _req: &Request, cfg: &mut KernelConfig) -> std::io::Result<()> {
        let _ = cfg.set_max_write(MAX_WRITE);
        let _ = cfg.set_max_background(64);
        let _ = cfg.set_congestion_threshold(48);
        let want = InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_POSIX_LOCKS
            | InitFlags::FUSE_FLOCK_LOCKS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO;
        if let Err(missing) = cfg.add_capabilities(want) {
            tracing::warn!(?missing, "kernel lacks some FUSE capabilities");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = try_reply!(reply, name_str(name));
        let vol = self.vol.clone();
        let me = self.shallow();
        self.rt.spawn(async move {
            let r = vol.lookup(parent.0, &name).await;
            me.entry_reply(reply, r);
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let vol = self.vol.clone();
        let me = self.shallow();
        self.rt.spawn(async move {
            let r = vol.getattr(ino.0).await;
            me.attr_reply(reply, r);
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ch = SetAttr {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(stamp),
            mtime: mtime.map(stamp),
        };
        let vol = self.vol.clone();
        let me = self.shallow();
        self.rt.spawn(async move {
            let r = vol.setattr(ino.0, ch).await;
            me.attr_reply(reply, r);
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            match vol.readlink(ino.0).await {
                Ok(t) => reply.data(t.as_bytes()),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let k = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => FileKind::File,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            libc::S_IFDIR => FileKind::Dir,
            _ => return reply.error(Errno::EINVAL),
        };
        self.make(req, parent, name, k, mode, umask, rdev, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, name, FileKind::Dir, mode, umask, 0, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = try_reply!(reply, name_str(name));
        let vol = self.vol.clone();
        self.rt
            .spawn(async move { empty(reply, vol.unlink(parent.0, &name).await) });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = try_reply!(reply, name_str(name));
        let vol = self.vol.clone();
        self.rt
            .spawn(async move { empty(reply, vol.rmdir(parent.0, &name).await) });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let name = try_reply!(reply, name_str(link_name));
        let target = try_reply!(reply, name_str(target.as_os_str()));
        let (uid, gid) = (req.uid(), req.gid());
        let vol = self.vol.clone();
        let me = self.shallow();
        self.rt.spawn(async move {
            let r = vol.symlink(parent.0, &name, &target, uid, gid).await;
            me.entry_reply(reply, r);
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let name = try_reply!(reply, name_str(name));
        let newname = try_reply!(reply, name_str(newname));
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            empty(
                reply,
                vol.rename(parent.0, &name, newparent.0, &newname, flags.bits())
                    .await,
            )
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let newname = try_reply!(reply, name_str(newname));
        let vol = self.vol.clone();
        let me = self.shallow();
        self.rt.spawn(async move {
            let r = vol.link(ino.0, newparent.0, &newname).await;
            me.entry_reply(reply, r);
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let vol = self.vol.clone();
        let files = self.files.clone();
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let notifier = self.notifier.clone();
        self.rt.spawn(async move {
            match vol.open_file(ino.0, writable).await {
                Ok((f, _attr)) => {
                    lock(&files).insert(fh, Arc::new(f));
                    // Close-to-open: drop the attributes the kernel cached (attr only,
                    // which takes no lock the open path holds).
                    if let Some(n) = notifier.get() {
                        let _ = n.inval_inode(ino, -1, 0);
                    }
                    reply.opened(FileHandle(fh), open_flags());
                }
                Err(e) => reply.error(inode_errno(&e)),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = try_reply!(reply, name_str(name));
        let (uid, gid) = (req.uid(), req.gid());
        let perm = mode & !umask & 0o7777;
        let writable = OpenFlags(flags).acc_mode() != OpenAccMode::O_RDONLY;
        let vol = self.vol.clone();
        let files = self.files.clone();
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let me = self.shallow();
        self.rt.spawn(async move {
            let r = async {
                let a = vol
                    .create(parent.0, &name, FileKind::File, perm, uid, gid, 0)
                    .await?;
                let (f, _) = vol.open_file(a.ino, writable).await?;
                Ok::<_, VolumeError>((a, f))
            }
            .await;
            match r {
                Ok((a, f)) => {
                    lock(&files).insert(fh, Arc::new(f));
                    reply.created(
                        &me.ttl_entry,
                        &fattr(&a),
                        Generation(a.generation),
                        FileHandle(fh),
                        open_flags(),
                    );
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let f = try_reply!(reply, self.file(fh));
        self.serve_inline(async move {
            match f.read(offset, size as usize).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let f = try_reply!(reply, self.file(fh));
        // One copy out of the request buffer, into memory an O_DIRECT LUN takes as is.
        let data = copy_aligned(data);
        self.serve_inline(async move {
            match f.write(offset, data).await {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let f = try_reply!(reply, self.file(fh));
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            let r = f.fsync().await;
            let u = vol.unlock_owner(ino.0, lock_owner.0).await;
            empty(reply, r.and(u));
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let f = lock(&self.files).remove(&fh.0);
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            if let Some(o) = lock_owner {
                let _ = vol.unlock_owner(ino.0, o.0).await;
            }
            drop(f);
            reply.ok();
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let f = try_reply!(reply, self.file(fh));
        self.rt.spawn(async move { empty(reply, f.fsync().await) });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let vol = self.vol.clone();
        let dirs = self.dirs.clone();
        self.rt.spawn(async move {
            let list = try_reply!(
                reply,
                listing(&vol, &dirs, ino.0, fh.0, offset)
                    .await
                    .map_err(|e| errno(&e))
            );
            for (i, e) in list.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(e.ino), i as u64 + 1, kind(e.kind), &e.name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let vol = self.vol.clone();
        let dirs = self.dirs.clone();
        let me = self.shallow();
        self.rt.spawn(async move {
            let list = try_reply!(
                reply,
                listing(&vol, &dirs, ino.0, fh.0, offset)
                    .await
                    .map_err(|e| errno(&e))
            );
            for (i, e) in list.iter().enumerate().skip(offset as usize) {
                let a = match vol.getattr_local(e.ino).await {
                    Ok(a) => a,
                    Err(_) => continue, // removed meanwhile
                };
                if reply.add(
                    INodeNo(e.ino),
                    i as u64 + 1,
                    &e.name,
                    &me.ttl_entry,
                    &fattr(&a),
                    Generation(a.generation),
                ) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Metadata is durable once applied (Raft commits are fsync'd).
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            match vol.statfs().await {
                Ok(s) => {
                    let free = s.free_blocks + s.reserved_blocks;
                    reply.statfs(
                        s.data_blocks,
                        free,
                        free,
                        s.inodes + (1 << 32),
                        1 << 32,
                        s.block_size,
                        255,
                        s.block_size,
                    );
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let name = try_reply!(reply, name_str(name));
        let value = value.to_vec();
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            empty(
                reply,
                vol.setxattr(ino.0, &name, &value, flags as u32).await,
            )
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = try_reply!(reply, name_str(name));
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            match vol.getxattr(ino.0, &name).await {
                Ok(v) if size == 0 => reply.size(v.len() as u32),
                Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
                Ok(v) => reply.data(&v),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            match vol.listxattr(ino.0).await {
                Ok(names) => {
                    let mut buf = Vec::new();
                    for n in names {
                        buf.extend_from_slice(n.as_bytes());
                        buf.push(0);
                    }
                    if size == 0 {
                        reply.size(buf.len() as u32)
                    } else if buf.len() > size as usize {
                        reply.error(Errno::ERANGE)
                    } else {
                        reply.data(&buf)
                    }
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = try_reply!(reply, name_str(name));
        let vol = self.vol.clone();
        self.rt
            .spawn(async move { empty(reply, vol.removexattr(ino.0, &name).await) });
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks the mode bits; this only checks existence.
        let vol = self.vol.clone();
        self.rt
            .spawn(async move { empty(reply, vol.getattr(ino.0).await.map(|_| ())) });
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let k = if typ == libc::F_WRLCK {
            AdvisoryKind::Write
        } else {
            AdvisoryKind::Read
        };
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            match vol
                .getlk(ino.0, lock_owner.0, start, lock_end(end), k)
                .await
            {
                Ok(Some(l)) => {
                    let t = if l.kind == AdvisoryKind::Write {
                        libc::F_WRLCK
                    } else {
                        libc::F_RDLCK
                    };
                    let end = if l.end == u64::MAX {
                        i64::MAX as u64
                    } else {
                        l.end
                    };
                    reply.locked(l.start, end, t, l.pid)
                }
                Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let k = match typ {
            libc::F_RDLCK => Some(AdvisoryKind::Read),
            libc::F_WRLCK => Some(AdvisoryKind::Write),
            libc::F_UNLCK => None,
            _ => return reply.error(Errno::EINVAL),
        };
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            empty(
                reply,
                vol.setlk(ino.0, lock_owner.0, start, lock_end(end), k, pid, sleep)
                    .await,
            )
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let f = try_reply!(reply, self.file(fh));
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let rest = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let m = match rest {
            0 => FallocMode::Allocate { keep_size: keep },
            libc::FALLOC_FL_PUNCH_HOLE if keep => FallocMode::PunchHole,
            libc::FALLOC_FL_ZERO_RANGE => FallocMode::ZeroRange { keep_size: keep },
            _ => return reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
        };
        self.rt
            .spawn(async move { empty(reply, f.fallocate(offset, length, m).await.map(|_| ())) });
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let f = try_reply!(reply, self.file(fh));
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        self.rt.spawn(async move {
            let r = match whence {
                libc::SEEK_DATA => f.seek_data(offset as u64).await,
                libc::SEEK_HOLE => f.seek_hole(offset as u64).await,
                _ => return reply.error(Errno::EINVAL),
            };
            match r {
                Ok(Some(p)) => reply.offset(p as i64),
                Ok(None) => reply.error(Errno::ENXIO),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }
}

/// The directory listing of handle `fh` (a snapshot taken at offset 0): `.`, `..`, then
/// the entries sorted by name. Offsets are positions in this snapshot.
async fn listing(
    vol: &Volume,
    dirs: &Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    ino: u64,
    fh: u64,
    offset: u64,
) -> Result<Arc<Vec<DirEntry>>, VolumeError> {
    if offset > 0
        && let Some(l) = lock(dirs).get(&fh).cloned()
    {
        return Ok(l);
    }
    let dot = |name: &str| DirEntry {
        name: name.into(),
        ino,
        kind: FileKind::Dir,
    };
    let mut list = vec![dot("."), dot("..")];
    let mut after: Option<String> = None;
    loop {
        let batch = vol.readdir(ino, after.as_deref(), DIR_BATCH).await?;
        let done = batch.len() < DIR_BATCH;
        after = batch.last().map(|e| e.name.clone());
        list.extend(batch);
        if done {
            break;
        }
    }
    let list = Arc::new(list);
    lock(dirs).insert(fh, list.clone());
    Ok(list)
}
