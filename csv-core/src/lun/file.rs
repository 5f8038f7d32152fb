//! [`FileLun`]: the LUN as a regular file or a block device (`/dev/...`).
//!
//! All I/O is positional (`pread`/`pwrite`). Reads and writes run on the LUN's own bounded
//! set of I/O threads ([`IoPool`]); flushes, FUA writes, discards and zeroing, which may wait for the
//! device, run on tokio's blocking pool. A runtime worker never blocks, with two exceptions
//! that save the two thread hand-offs per request that dominate small I/O:
//! - a page-cache hit is read with `RWF_NOWAIT` on the calling thread;
//! - on a thread inside an [`InlineIo`] scope (a FUSE request thread) every syscall runs
//!   inline, and on a thread that called [`InlineIo::allow_page_cache_io_on_this_thread`] (the
//!   NBD server's own runtime) buffered non-FUA writes do, and buffered reads that miss the
//!   page cache block there after yielding once.
//!
//! Invariants:
//! - the size is fixed at open (file length, or the device size found by seeking to its end);
//! - a LUN other hosts can write (a block device, a file on NFS/SMB/9P) is opened with O_DIRECT
//!   unless the caller asks for [`CacheMode::Buffered`]: no host's page cache may answer a
//!   read with blocks another host has overwritten;
//! - with `direct` (O_DIRECT) the alignment is 4096 and every buffer handed to the kernel is
//!   4096-aligned: reads land in a fresh aligned buffer that becomes the returned `Bytes`
//!   (no copy), writes of aligned `Bytes` (see [`copy_aligned`]) go to the kernel as they
//!   are, other writes are copied through an aligned bounce buffer;
//! - `write_at(.., fua = true)` returns only after `fdatasync` succeeded; `flush` is `fdatasync`;
//! - `discard` punches a hole (files) or issues BLKDISCARD (block devices); a target that cannot
//!   discard is not an error, since discard is advisory;
//! - `write_zeroes` uses `fallocate(ZERO_RANGE)` and falls back to writing zeros.

use std::alloc::Layout;
use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io;
use std::io::{Seek, SeekFrom};
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;

use super::bufpool::BufPool;
use super::iopool::IoPool;
use super::mapped::MappedLun;
use super::pipe;
use super::{Cached, Lun, LunError, LunFuture, ZeroCopy, check_aligned, check_range};

/// Alignment (and buffer alignment) required with O_DIRECT.
pub const DIRECT_ALIGN: u32 = 4096;

/// Linux `BLKDISCARD` = `_IO(0x12, 119)` (not exported by the `libc` crate).
const BLKDISCARD: libc::c_ulong = 0x1277;

/// Largest buffer one blocking call handles for zero fallback writes.
const ZERO_STEP: u64 = 1 << 20;

/// Whether a [`FileLun`] goes through this host's page cache.
///
/// A block device is a SAN LUN that other hosts write too, and each host's page cache of it
/// is its own: a buffered read can answer from cached blocks that another host has since
/// overwritten, and a partial-sector write then merges into them. So a block device, and a
/// file on a network file system (NFS, SMB, 9P), bypass the page cache unless told otherwise.
/// Any other regular file is shared only by nodes on one host (the local cluster), which all
/// see the one page cache of the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// O_DIRECT for a block device or a file on a network file system, the page cache for
    /// a local file.
    #[default]
    Auto,
    /// Always O_DIRECT; requests must then be 4096-aligned.
    Direct,
    /// Always the page cache. On a block device, only safe when every node runs on this host.
    Buffered,
}

impl CacheMode {
    /// `Some(true)` = Direct, `Some(false)` = Buffered, `None` = Auto (a config's `lun_direct`).
    pub fn from_config(direct: Option<bool>) -> CacheMode {
        match direct {
            None => CacheMode::Auto,
            Some(true) => CacheMode::Direct,
            Some(false) => CacheMode::Buffered,
        }
    }

    /// Whether a LUN opened with this mode uses O_DIRECT. `shared` says other hosts can
    /// write the LUN: a block device, or a file on a network file system.
    pub fn is_direct(self, shared: bool) -> bool {
        match self {
            CacheMode::Auto => shared,
            CacheMode::Direct => true,
            CacheMode::Buffered => false,
        }
    }
}

/// `statfs(2)` magic numbers of network file systems whose clients cache file data on their
/// own host (NFS, SMB/CIFS, 9P): a LUN image on one of them is written by other hosts behind
/// this host's page cache, as a shared block device is.
const NETWORK_FS_MAGIC: [i64; 4] = [
    0x6969,                // NFS
    0xFF53_4D42u32 as i64, // CIFS
    0xFE53_4D42u32 as i64, // SMB2
    0x0102_1997,           // 9P
];

/// Whether `f_type` (from `statfs(2)`) is a network file system of [`NETWORK_FS_MAGIC`].
fn is_network_fs(f_type: i64) -> bool {
    // f_type is signed on some targets: compare the low 32 bits.
    NETWORK_FS_MAGIC
        .iter()
        .any(|m| (m & 0xFFFF_FFFF) == (f_type & 0xFFFF_FFFF))
}

/// Whether the file system holding `file` is a network file system (false when unknown).
fn on_network_fs(file: &File) -> bool {
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is owned by `file` and `st` is a live struct for the call's duration.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    rc == 0 && is_network_fs(st.f_type as i64)
}

/// Turns on O_DIRECT for an open file (Linux accepts it through `F_SETFL`); fails where the
/// file system cannot do direct I/O (tmpfs: `EINVAL`), as an open with the flag would.
fn set_direct(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on a descriptor owned by `file` touch nothing else.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How to open a [`FileLun`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileLunOptions {
    /// Page cache or O_DIRECT (see [`CacheMode`]).
    pub cache: CacheMode,
    /// Open read-only; writes, discards and zeroing fail.
    pub read_only: bool,
}

/// A LUN backed by a regular file or a block device.
pub struct FileLun {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    opts: FileLunOptions,
    /// Opened with O_DIRECT (the resolved [`CacheMode`]).
    direct: bool,
    block_device: bool,
    /// Buffered writes are first tried with `RWF_NOWAIT` (cleared once the file system
    /// answers `EOPNOTSUPP`).
    nowait_writes: AtomicBool,
    /// Runs reads and writes that cannot complete on the calling thread.
    pool: IoPool,
    /// Large buffers of page-cache reads, recycled while still warm in the CPU cache.
    bufs: Arc<BufPool>,
    /// Windows of the file mapped for [`ZeroCopy::Map`] reads (buffered LUNs only).
    mapped: Option<MappedLun>,
}

/// Idle read buffers a LUN keeps (a few MiB at most: 1 MiB reads at queue depth 8-16).
const READ_BUFS_KEPT: usize = 16;

/// I/O threads of a buffered LUN (the default, block devices included): a read that misses
/// the page cache waits for the device, so the pool must keep enough of them in flight for a
/// SAN array; page-cache copies are short and queue behind busy threads without a wake-up.
const BUFFERED_IO_THREADS: usize = 16;
/// I/O threads of an O_DIRECT LUN: each request waits for the device, so the pool must hold
/// as many requests in flight as the device can take.
const DIRECT_IO_THREADS: usize = 32;

thread_local! {
    /// Set while the current thread is inside an [`InlineIo`] scope.
    static INLINE_IO: Cell<bool> = const { Cell::new(false) };
    /// Set for good on threads dedicated to a frontend's I/O, see
    /// [`InlineIo::allow_page_cache_io_on_this_thread`].
    static PAGE_CACHE_IO: Cell<bool> = const { Cell::new(false) };
}

/// While alive, [`FileLun`] requests polled on this thread run their syscalls inline
/// (blocking this thread) instead of on tokio's blocking pool.
///
/// Enter it only on a thread that may block and is not a runtime worker, e.g. a FUSE
/// request thread that polls a volume future once before handing it to the runtime. The
/// guard is not `Send`: it restores the previous state of its own thread on drop.
pub struct InlineIo {
    prev: bool,
    _thread_bound: PhantomData<*const ()>,
}

impl std::fmt::Debug for InlineIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineIo").finish()
    }
}

impl InlineIo {
    /// Lets this thread block in file I/O until the guard drops.
    pub fn enter() -> InlineIo {
        InlineIo {
            prev: INLINE_IO.with(|c| c.replace(true)),
            _thread_bound: PhantomData,
        }
    }

    /// True when the current thread is inside an [`InlineIo`] scope.
    pub fn is_entered() -> bool {
        INLINE_IO.with(Cell::get)
    }

    /// From now on, buffered (not O_DIRECT, not FUSE) reads and writes polled on this thread
    /// run on it: a page-cache copy is cheaper than the thread hand-offs that moving it to an
    /// I/O thread and back costs. A write runs inline. A read is first tried without blocking
    /// (`RWF_NOWAIT`); if it must wait for the device, the future yields once (so the task
    /// that polled it first, e.g. an NBD connection's reader, is not the one that blocks) and
    /// then reads blocking on whichever thread polls it next. O_DIRECT I/O and syncs still go
    /// to the I/O threads.
    ///
    /// Call it only on the many worker threads of a runtime that serves frontend I/O and
    /// nothing else (the NBD server's, via `on_thread_start`): a blocked thread then delays
    /// only that frontend's requests (as one of nbdkit's threads would), never the Raft node,
    /// leases or timers, which run on another runtime.
    pub fn allow_page_cache_io_on_this_thread() {
        PAGE_CACHE_IO.with(|c| c.set(true));
    }

    /// True when buffered reads and writes may run inline on this thread (inside an
    /// [`InlineIo`] scope, or after [`InlineIo::allow_page_cache_io_on_this_thread`]).
    pub fn page_cache_allowed() -> bool {
        Self::is_entered() || PAGE_CACHE_IO.with(Cell::get)
    }
}

impl Drop for InlineIo {
    fn drop(&mut self) {
        INLINE_IO.with(|c| c.set(self.prev));
    }
}

/// A 4096-aligned heap buffer of `len` initialized bytes (its allocation is `len`
/// rounded up to 4096, at least 4096).
struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like a `Box<[u8]>`); it has no
// interior mutability and no thread affinity.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads the bytes (`as_slice`).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> io::Result<Layout> {
        let size = len
            .max(1)
            .checked_next_multiple_of(DIRECT_ALIGN as usize)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Layout::from_size_align(size, DIRECT_ALIGN as usize)
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))
    }

    /// A zeroed buffer of `len` bytes.
    fn zeroed(len: usize) -> io::Result<AlignedBuf> {
        let layout = Self::layout(len)?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(AlignedBuf { ptr, len, layout })
    }

    /// A buffer holding a copy of `data`.
    fn copy_of(data: &[u8]) -> io::Result<AlignedBuf> {
        let layout = Self::layout(data.len())?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: the allocation holds at least `data.len()` bytes and is fresh, so it
        // cannot overlap `data`; afterwards the first `data.len()` bytes are initialized.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len()) };
        Ok(AlignedBuf {
            ptr,
            len: data.len(),
            layout,
        })
    }

    /// Reads exactly `len` bytes of `file` at `offset` into a new buffer (no zeroing
    /// first: the bytes are exposed only once the kernel has filled all of them).
    fn read_from(file: &File, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        let layout = Self::layout(len)?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // Owns the allocation from here on, so every early return frees it; `len` stays 0
        // (nothing exposed) until the read is complete.
        let mut buf = AlignedBuf {
            ptr,
            len: 0,
            layout,
        };
        let mut done = 0usize;
        while done < len {
            let pos = offset
                .checked_add(done as u64)
                .and_then(|p| libc::off_t::try_from(p).ok())
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: `ptr + done .. ptr + len` lies inside the live allocation owned by
            // `buf`, which nothing else references; pread writes at most `len - done` bytes.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    buf.ptr.as_ptr().add(done).cast(),
                    len - done,
                    pos,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                _ => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
        buf.len = len;
        Ok(buf)
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the allocation are initialized (every
        // constructor guarantees it) and live as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated with exactly `layout` and is freed only here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Copies `data` into a new 4096-aligned buffer. A write of such `Bytes` (or of a slice
/// of it starting at a multiple of 4096) reaches an O_DIRECT [`FileLun`] without another
/// copy; frontends that must copy request data anyway should copy with this.
pub fn copy_aligned(data: &[u8]) -> Bytes {
    match AlignedBuf::copy_of(data) {
        Ok(buf) => Bytes::from_owner(buf),
        // Out of memory for the aligned layout: a plain copy still works (the LUN then
        // bounces it).
        Err(_) => Bytes::copy_from_slice(data),
    }
}

fn is_aligned(data: &[u8]) -> bool {
    (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN as usize)
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> LunError {
    move |source| LunError::Io { op, offset, source }
}

/// Tries a buffered read on the calling (async) thread with `RWF_NOWAIT`: it succeeds only
/// when the page cache serves it without blocking. `None` (would block, unsupported, short)
/// sends the caller to the blocking pool, which saves two thread hand-offs per cached read.
/// The buffer is not zeroed first: its bytes are exposed only after the kernel filled all.
fn read_nowait(file: &File, len: usize, offset: u64, bufs: &Arc<BufPool>) -> Option<Bytes> {
    let off = i64::try_from(offset).ok()?;
    let mut buf = bufs.take(len);
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: `iov` points at the `len` bytes of capacity of `buf`, owned here and not
    // otherwise referenced during the call; the fd is owned by `file`, which outlives it.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if n < 0 || n as usize != len {
        bufs.give_back(buf);
        return None;
    }
    // SAFETY: the kernel initialised all `len` bytes (a full read), within the capacity.
    unsafe { buf.set_len(len) };
    Some(bufs.freeze(buf))
}

/// Like [`read_nowait`] for a buffered write; returns the bytes written (possibly fewer than
/// asked, the rest then goes through the blocking pool), or `Err(())` when the file does not
/// support `RWF_NOWAIT` writes at all.
fn write_nowait(file: &File, data: &[u8], offset: u64) -> Result<usize, ()> {
    let Ok(off) = i64::try_from(offset) else {
        return Ok(0);
    };
    let iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: `iov` points at `data`, valid for the call (pwritev2 only reads it); the fd is
    // owned by `file`, which outlives the call.
    let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    match usize::try_from(n) {
        Ok(n) => Ok(n),
        Err(_) if io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) => Err(()),
        Err(_) => Ok(0),
    }
}

/// Runs a blocking closure off the calling thread, or inline inside an [`InlineIo`] scope.
/// Reads and writes go to the LUN's own I/O threads (`pool`); rare, possibly long operations
/// (flush, FUA writes, discard, zeroing) pass `None` and go to tokio's blocking pool, so that
/// they never hold up the I/O threads.
async fn off_thread<T: Send + 'static>(
    pool: Option<&IoPool>,
    op: &'static str,
    offset: u64,
    f: impl FnOnce() -> Result<T, LunError> + Send + 'static,
) -> Result<T, LunError> {
    if InlineIo::is_entered() {
        return f();
    }
    let res = match pool {
        Some(pool) => pool.run(f).await,
        None => tokio::task::spawn_blocking(f)
            .await
            .map_err(io::Error::other),
    };
    res.unwrap_or_else(|source| Err(LunError::Io { op, offset, source }))
}

/// `fallocate(2)` on `file`; Ok(false) when the file system or device does not support `mode`.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
    let (off, n) = match (i64::try_from(offset), i64::try_from(len)) {
        (Ok(o), Ok(n)) => (o, n),
        _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
    };
    // SAFETY: plain syscall on a file descriptor we own for the duration of the call;
    // no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(false),
        _ => Err(err),
    }
}

/// `ioctl(BLKDISCARD)`; Ok(false) when the device cannot discard.
fn blk_discard(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads exactly two u64 (start, length) from the pointer, which
    // points to a live local array for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) => Ok(false),
        _ => Err(err),
    }
}

impl FileLun {
    /// Opens `path` (a regular file or a block device) as a LUN.
    pub fn open(path: impl AsRef<Path>, opts: FileLunOptions) -> io::Result<FileLun> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(&path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let shared = block_device || on_network_fs(&file);
        let direct = opts.cache.is_direct(shared);
        if direct {
            set_direct(&file)?;
        }
        if shared && !direct {
            tracing::warn!(
                path = %path.display(),
                "LUN that other hosts can write (a block device or a file on a network file \
                 system) opened through the page cache (lun_direct = false): another \
                 host's writes may stay invisible to this node; only safe when every node runs \
                 on this host"
            );
        }
        let size = if block_device {
            (&file).seek(SeekFrom::End(0))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        let file = Arc::new(file);
        Ok(FileLun {
            mapped: (!direct).then(|| MappedLun::new(file.clone(), size)),
            file,
            path,
            size,
            opts,
            direct,
            block_device,
            nowait_writes: AtomicBool::new(true),
            pool: IoPool::new(
                "csv-lun-io",
                if direct {
                    DIRECT_IO_THREADS
                } else {
                    BUFFERED_IO_THREADS
                },
            ),
            bufs: BufPool::new(READ_BUFS_KEPT),
        })
    }

    /// True when the LUN is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), LunError> {
        check_range(offset, len, self.size)?;
        check_aligned(offset, len, self.alignment())
    }

    fn check_writable(&self, op: &'static str, offset: u64) -> Result<(), LunError> {
        if self.opts.read_only {
            return Err(LunError::Io {
                op,
                offset,
                source: io::Error::new(io::ErrorKind::PermissionDenied, "LUN opened read-only"),
            });
        }
        Ok(())
    }
}

/// Writes `len` zero bytes at `offset` through an aligned buffer (valid with O_DIRECT:
/// `offset` and `len` are then multiples of 4096, and so is every piece).
fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let step = len.min(ZERO_STEP) as usize;
    let buf = AlignedBuf::zeroed(step)?;
    let zeros = buf.as_slice();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(step as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl Lun for FileLun {
    fn size(&self) -> u64 {
        self.size
    }

    fn alignment(&self) -> u32 {
        if self.direct { DIRECT_ALIGN } else { 512 }
    }

    fn describe(&self) -> String {
        let kind = if self.block_device {
            "blockdev"
        } else {
            "file"
        };
        let direct = if self.direct { "+direct" } else { "" };
        format!("{kind}{direct}:{}", self.path.display())
    }

    fn read_at(&self, offset: u64, len: usize) -> LunFuture<'_, Bytes> {
        Box::pin(async move {
            self.check(offset, len as u64)?;
            if len == 0 {
                return Ok(Bytes::new());
            }
            let file = self.file.clone();
            let direct = self.direct;
            if !direct
                && !InlineIo::is_entered()
                && let Some(buf) = read_nowait(&file, len, offset, &self.bufs)
            {
                return Ok(buf);
            }
            if !direct && !InlineIo::is_entered() && InlineIo::page_cache_allowed() {
                // A frontend I/O thread (one of many): wait for the device right here, but only
                // after yielding once, so that the task that polled the request first (an NBD
                // connection's reader) goes on reading requests while another thread blocks.
                tokio::task::yield_now().await;
                // Checked again: the future may have moved to a thread that must not block.
                if InlineIo::page_cache_allowed() {
                    let buf = AlignedBuf::read_from(&file, offset, len)
                        .map_err(io_err("read", offset))?;
                    return Ok(Bytes::from_owner(buf));
                }
            }
            off_thread(Some(&self.pool), "read", offset, move || {
                let buf =
                    AlignedBuf::read_from(&file, offset, len).map_err(io_err("read", offset))?;
                Ok(Bytes::from_owner(buf))
            })
            .await
        })
    }

    fn read_cached(&self, offset: u64, len: usize, how: ZeroCopy) -> Option<Cached> {
        // O_DIRECT LUNs bypass the page cache: nothing there to reference.
        if self.direct || self.check(offset, len as u64).is_err() {
            return None;
        }
        match how {
            ZeroCopy::Splice => pipe::splice_cached(&self.file, offset, len).map(Cached::Pipe),
            ZeroCopy::Map => self.mapped.as_ref()?.view(offset, len).map(Cached::Mapped),
        }
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, data.len() as u64)?;
            self.check_writable("write", offset)?;
            if data.is_empty() && !fua {
                return Ok(());
            }
            let file = self.file.clone();
            let direct = self.direct;
            let (mut offset, mut data) = (offset, data);
            if !direct && !fua && !InlineIo::is_entered() && self.nowait_writes.load(Relaxed) {
                let done = match write_nowait(&file, &data, offset) {
                    Ok(n) => n,
                    Err(()) => {
                        // The file system never accepts non-blocking buffered writes
                        // (ext4 among them): stop paying a syscall per write to learn it.
                        self.nowait_writes.store(false, Relaxed);
                        0
                    }
                };
                if done == data.len() {
                    return Ok(());
                }
                offset += done as u64;
                data = data.slice(done..);
            }
            if !direct && !fua && InlineIo::page_cache_allowed() {
                // A buffered write only copies into the page cache; where it blocks (write-back
                // throttling) that is the back-pressure the writer should feel.
                return file
                    .write_all_at(&data, offset)
                    .map_err(io_err("write", offset));
            }
            let bounce = self.direct && !is_aligned(&data);
            let job = move || {
                if bounce {
                    AlignedBuf::copy_of(&data)
                        .and_then(|buf| file.write_all_at(buf.as_slice(), offset))
                } else {
                    file.write_all_at(&data, offset)
                }
                .map_err(io_err("write", offset))?;
                if fua {
                    file.sync_data().map_err(io_err("write+fua sync", offset))?;
                }
                Ok(())
            };
            if fua {
                off_thread(None, "write", offset, job).await
            } else {
                off_thread(Some(&self.pool), "write", offset, job).await
            }
        })
    }

    fn flush(&self) -> LunFuture<'_, ()> {
        Box::pin(async move {
            let file = self.file.clone();
            off_thread(None, "flush", 0, move || {
                file.sync_data().map_err(io_err("flush", 0))
            })
            .await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, len)?;
            self.check_writable("discard", offset)?;
            if len == 0 {
                return Ok(());
            }
            let file = self.file.clone();
            let block_device = self.block_device;
            off_thread(None, "discard", offset, move || {
                let res = if block_device {
                    blk_discard(&file, offset, len)
                } else {
                    fallocate(
                        &file,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                };
                // Unsupported is fine: discard is advisory.
                res.map(|_| ()).map_err(io_err("discard", offset))
            })
            .await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, len)?;
            self.check_writable("write_zeroes", offset)?;
            if len == 0 {
                return Ok(());
            }
            let file = self.file.clone();
            off_thread(None, "write_zeroes", offset, move || {
                let zeroed = fallocate(
                    &file,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .map_err(io_err("write_zeroes", offset))?;
                if !zeroed {
                    write_zeros(&file, offset, len).map_err(io_err("write_zeroes", offset))?;
                }
                Ok(())
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(len: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun.img");
        File::create(&path).unwrap().set_len(len).unwrap();
        (dir, path)
    }

    #[test]
    fn aligned_buf_is_4096_aligned() {
        let buf = AlignedBuf::zeroed(8192).unwrap();
        assert_eq!(buf.as_slice().as_ptr() as usize % 4096, 0);
        assert_eq!(buf.as_slice().len(), 8192);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        let copy = copy_aligned(&[7u8; 5000]);
        assert!(is_aligned(&copy));
        assert_eq!(copy[..], [7u8; 5000]);
    }

    #[test]
    fn read_past_the_end_of_file_fails_instead_of_exposing_uninitialized_bytes() {
        let (_dir, path) = make(8192);
        let file = File::open(&path).unwrap();
        let err = AlignedBuf::read_from(&file, 4096, 8192).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let ok = AlignedBuf::read_from(&file, 4096, 4096).unwrap();
        assert_eq!(ok.as_slice(), &[0u8; 4096][..]);
    }

    #[test]
    fn inline_io_scope_runs_file_io_on_the_calling_thread_and_nests() {
        let (_dir, path) = make(1 << 16);
        let lun = FileLun::open(&path, FileLunOptions::default()).unwrap();
        assert!(!InlineIo::is_entered());
        let outer = InlineIo::enter();
        {
            let _inner = InlineIo::enter();
        }
        assert!(
            InlineIo::is_entered(),
            "an inner scope must restore the outer one"
        );
        // No runtime on this thread: without the scope this would panic in spawn_blocking.
        let me = std::thread::current().id();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut w = lun.write_at(4096, copy_aligned(&[9u8; 4096]), false);
        assert!(matches!(
            w.as_mut().poll(&mut cx),
            std::task::Poll::Ready(Ok(()))
        ));
        let mut r = lun.read_at(4096, 4096);
        match r.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(Ok(d)) => assert_eq!(d[..], [9u8; 4096]),
            other => panic!("inline read did not complete at once: {other:?}"),
        }
        assert_eq!(std::thread::current().id(), me);
        drop(outer);
        assert!(!InlineIo::is_entered());
    }

    /// Polls `fut` once on this thread.
    fn poll_once<F: Future + ?Sized>(fut: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        fut.poll(&mut std::task::Context::from_waker(waker))
    }

    #[test]
    fn buffered_writes_run_inline_only_on_threads_allowed_page_cache_io() {
        let (_dir, path) = make(1 << 16);
        let lun = Arc::new(FileLun::open(&path, FileLunOptions::default()).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // An ordinary thread: the write goes to the LUN's I/O threads (pending at first).
        let l = lun.clone();
        let first = std::thread::spawn(move || {
            let _rt = rt.enter();
            let mut w = l.write_at(0, Bytes::from(vec![1u8; 4096]), false);
            let pending = poll_once(w.as_mut()).is_pending();
            (pending, rt)
        });
        let (pending, rt) = first.join().unwrap();
        assert!(pending, "a runtime worker must not block in pwrite");
        // A thread that allowed page-cache I/O: done on the first poll, on this thread; a FUA
        // write (a sync) still leaves it.
        let l = lun.clone();
        std::thread::spawn(move || {
            let _rt = rt.enter();
            InlineIo::allow_page_cache_io_on_this_thread();
            assert!(InlineIo::page_cache_allowed() && !InlineIo::is_entered());
            let mut w = l.write_at(4096, Bytes::from(vec![2u8; 4096]), false);
            assert!(matches!(
                poll_once(w.as_mut()),
                std::task::Poll::Ready(Ok(()))
            ));
            let mut r = l.read_at(4096, 4096);
            match poll_once(r.as_mut()) {
                std::task::Poll::Ready(Ok(d)) => assert_eq!(d[..], [2u8; 4096]),
                other => panic!("a cached read did not complete at once: {other:?}"),
            }
            let mut f = l.write_at(8192, Bytes::from(vec![3u8; 4096]), true);
            assert!(poll_once(f.as_mut()).is_pending(), "FUA syncs off-thread");
            // A read that misses the page cache yields once, then blocks on this thread.
            l.file.sync_all().unwrap();
            // SAFETY: plain syscall on a file descriptor owned by `l`; no memory is passed.
            let rc =
                unsafe { libc::posix_fadvise(l.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0);
            let mut r = l.read_at(4096, 4096);
            let got = match poll_once(r.as_mut()) {
                // Still cached (the kernel may keep pages despite the advice).
                std::task::Poll::Ready(res) => res,
                std::task::Poll::Pending => match poll_once(r.as_mut()) {
                    std::task::Poll::Ready(res) => res,
                    std::task::Poll::Pending => panic!("a read after the yield left this thread"),
                },
            };
            assert_eq!(got.unwrap()[..], [2u8; 4096]);
        })
        .join()
        .unwrap();
        assert!(
            !InlineIo::page_cache_allowed(),
            "the permission is per thread"
        );
    }

    #[tokio::test]
    async fn direct_lun_writes_unaligned_and_aligned_buffers_alike() {
        let (_dir, path) = make(1 << 16);
        let lun = match FileLun::open(
            &path,
            FileLunOptions {
                cache: CacheMode::Direct,
                read_only: false,
            },
        ) {
            Ok(l) => l,
            // tmpfs and some overlay file systems refuse O_DIRECT.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        // An unaligned Bytes (offset by one byte inside its allocation) is bounced.
        let raw = Bytes::from(vec![3u8; 8193]).slice(1..);
        lun.write_at(0, raw, false).await.unwrap();
        lun.write_at(8192, copy_aligned(&[4u8; 8192]), false)
            .await
            .unwrap();
        let d = lun.read_at(0, 16384).await.unwrap();
        assert!(is_aligned(&d), "reads hand out the aligned buffer itself");
        assert!(d[..8192].iter().all(|&b| b == 3));
        assert!(d[8192..].iter().all(|&b| b == 4));
    }

    #[test]
    fn auto_cache_mode_buffers_regular_files_and_bypasses_the_cache_of_block_devices() {
        assert!(CacheMode::Auto.is_direct(true));
        assert!(!CacheMode::Auto.is_direct(false));
        assert!(CacheMode::Direct.is_direct(false));
        assert!(!CacheMode::Buffered.is_direct(true));
        assert_eq!(CacheMode::from_config(None), CacheMode::Auto);
        assert_eq!(CacheMode::from_config(Some(true)), CacheMode::Direct);
        assert_eq!(CacheMode::from_config(Some(false)), CacheMode::Buffered);
        assert!(is_network_fs(0x6969) && is_network_fs(0xFE53_4D42) && is_network_fs(0x0102_1997));
        // statfs reports CIFS's magic sign-extended on some targets.
        assert!(is_network_fs(0xFF53_4D42u32 as i32 as i64));
        assert!(!is_network_fs(0xEF53) && !is_network_fs(0x0102_1994)); // ext4, tmpfs
        let (_dir, path) = make(1 << 16);
        let lun = FileLun::open(&path, FileLunOptions::default()).unwrap();
        assert_eq!(lun.describe(), format!("file:{}", path.display()));
        assert_eq!(lun.alignment(), 512);
    }

    #[tokio::test]
    async fn read_only_lun_refuses_writes_and_reads_file_contents() {
        let (_dir, path) = make(1 << 16);
        std::fs::write(&path, vec![0x5a; 1 << 16]).unwrap();
        let lun = FileLun::open(
            &path,
            FileLunOptions {
                cache: CacheMode::Buffered,
                read_only: true,
            },
        )
        .unwrap();
        assert_eq!(lun.read_at(512, 512).await.unwrap()[..], [0x5a; 512]);
        let err = lun
            .write_at(0, Bytes::from(vec![0; 512]), false)
            .await
            .unwrap_err();
        assert!(matches!(err, LunError::Io { op: "write", .. }), "{err}");
    }

    #[tokio::test]
    async fn write_zeroes_and_discard_reach_the_backing_file() {
        let (_dir, path) = make(1 << 16);
        let lun = FileLun::open(&path, FileLunOptions::default()).unwrap();
        lun.write_at(0, Bytes::from(vec![1; 1 << 16]), true)
            .await
            .unwrap();
        lun.write_zeroes(4096, 8192).await.unwrap();
        lun.discard(32768, 4096).await.unwrap();
        lun.flush().await.unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[..4096].iter().all(|&b| b == 1));
        assert!(on_disk[4096..12288].iter().all(|&b| b == 0));
        assert!(on_disk[12288..32768].iter().all(|&b| b == 1));
        // ext4/xfs/tmpfs punch holes, so the discarded range reads as zeros here.
        assert!(
            on_disk[32768..36864].iter().all(|&b| b == 0 || b == 1),
            "discard left foreign data"
        );
        assert_eq!(on_disk.len(), 1 << 16, "size must be kept");
    }

    #[test]
    fn opening_a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileLun::open(dir.path(), FileLunOptions::default())
            .err()
            .unwrap();
        assert!(
            err.kind() == io::ErrorKind::InvalidInput || err.raw_os_error() == Some(libc::EISDIR),
            "{err}"
        );
    }
}
