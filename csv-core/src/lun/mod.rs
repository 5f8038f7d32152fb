//! The shared LUN: the one block device every node attaches read/write.
//!
//! [`Lun`] is the only way any layer above touches the disk. Backends:
//! a file or block device (`file`), an NBD target (`nbd`), an in-memory
//! disk for tests (`mem`) and a fault-injecting wrapper (`fault`).
//!
//! Invariants every backend keeps (checked by the conformance suite in `tests`):
//! - `read_at`/`write_at` outside `[0, size)` fail with [`LunError::OutOfRange`], never short;
//! - a write acknowledged with `fua = true`, or followed by a successful `flush`, is durable;
//! - `discard` is advisory: afterwards the range reads as either the old data or zeros;
//! - `write_zeroes` makes the range read back as zeros.

pub mod bufpool;
pub mod conformance;
pub mod fault;
pub mod file;
pub mod iopool;
pub mod mapped;
pub mod mem;
pub mod nbd;
pub mod open;
pub mod pipe;
pub mod zerocopy;

pub use fault::{FaultError, FaultHandle, FaultLun, OpKind, OpSet};
pub use file::{CacheMode, FileLun, FileLunOptions};
pub use mem::MemLun;
pub use nbd::{NbdLun, NbdOptions};
pub use open::{LunOpenOptions, open_lun};
pub use zerocopy::{Cached, ZeroCopy};

use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;

/// A boxed future returned by [`Lun`] methods (the trait must stay dyn-compatible:
/// the backend is chosen at run time from the configuration).
pub type LunFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LunError>> + Send + 'a>>;

/// What a LUN backend failed to do. `Path*` variants mean the path to the LUN is
/// broken (the redirector's cue); the others are errors of the request itself.
#[derive(Debug, thiserror::Error)]
pub enum LunError {
    #[error("LUN request out of range: offset {offset} + length {len} exceeds size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("LUN request misaligned: offset {offset}, length {len}, alignment {align}")]
    Misaligned { offset: u64, len: u64, align: u32 },
    #[error("LUN {op} at offset {offset} failed")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("LUN path unreachable: {reason}")]
    PathUnreachable { reason: String },
    #[error("LUN {op} timed out after {ms} ms")]
    Timeout { op: &'static str, ms: u64 },
    #[error("LUN target refused {op}: NBD error {errno}")]
    Target { op: &'static str, errno: u32 },
    #[error("LUN write refused: fencing token {token} is stale")]
    Fenced { token: u64 },
    #[error("LUN backend is closed")]
    Closed,
}

impl LunError {
    /// True when the error says the *path* is bad (retry elsewhere), not the request.
    pub fn is_path_error(&self) -> bool {
        matches!(
            self,
            LunError::Io { .. }
                | LunError::PathUnreachable { .. }
                | LunError::Timeout { .. }
                | LunError::Closed
                | LunError::Target { .. }
        )
    }
}

/// Positional block I/O on the shared LUN.
pub trait Lun: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Offsets and lengths must be multiples of this (512 for most, 4096 with O_DIRECT).
    fn alignment(&self) -> u32 {
        512
    }
    /// A short human description (`file:/path`, `nbd://...`) for logs and status.
    fn describe(&self) -> String;
    /// Reads exactly `len` bytes at `offset`.
    fn read_at(&self, offset: u64, len: usize) -> LunFuture<'_, Bytes>;
    /// Writes all of `data` at `offset`; with `fua` the data is durable on return.
    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> LunFuture<'_, ()>;
    /// Makes every write acknowledged before this call durable.
    fn flush(&self) -> LunFuture<'_, ()>;
    /// Advisory: the range's contents may be dropped (reads return old data or zeros).
    fn discard(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        let _ = (offset, len);
        Box::pin(async { Ok(()) })
    }
    /// Makes the range read back as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        Box::pin(async move {
            const STEP: u64 = 1 << 20;
            let zero = Bytes::from(vec![0u8; STEP as usize]);
            let mut done = 0;
            while done < len {
                let n = (len - done).min(STEP);
                self.write_at(offset + done, zero.slice(..n as usize), false)
                    .await?;
                done += n;
            }
            Ok(())
        })
    }
    /// Makes every write acknowledged before this call durable **and final**: afterwards no
    /// write whose outcome was unknown (a request that timed out on a hung path, a "ghost")
    /// can still land. The volume calls it before a file's data lock moves to another node.
    /// A backend without unknown outcomes just flushes.
    fn settle(&self) -> LunFuture<'_, ()> {
        self.flush()
    }
    /// Takes `len` bytes at `offset` the way `how` says (spliced into a pipe, or viewed in a
    /// mapping), without copying and without waiting: only when every byte is in this node's
    /// page cache and the LUN is read directly. `None`: not possible now; read with
    /// [`Lun::read_at`] instead (which also reports errors). The default never does.
    fn read_cached(&self, offset: u64, len: usize, how: ZeroCopy) -> Option<Cached> {
        let _ = (offset, len, how);
        None
    }
    /// Writes on behalf of the holder of a fencing token (the file's data lock). A
    /// backend that forwards I/O to another node (the redirector) sends the token along
    /// so the peer can refuse a stale writer; direct backends ignore it.
    fn write_fenced(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        fence: Option<IoFence>,
    ) -> LunFuture<'_, ()> {
        let _ = fence;
        self.write_at(offset, data, fua)
    }
}

/// The writer's credentials carried with a block write: the lock key and the fencing
/// token of its current grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoFence {
    pub key: String,
    pub token: u64,
}

/// A shared LUN is a LUN, so wrappers such as [`FaultLun`] can hold what
/// [`open_lun`] returns (`FaultLun<Arc<dyn Lun>>`).
impl<L: Lun + ?Sized> Lun for std::sync::Arc<L> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn alignment(&self) -> u32 {
        (**self).alignment()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn read_at(&self, offset: u64, len: usize) -> LunFuture<'_, Bytes> {
        (**self).read_at(offset, len)
    }
    fn read_cached(&self, offset: u64, len: usize, how: ZeroCopy) -> Option<Cached> {
        (**self).read_cached(offset, len, how)
    }
    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> LunFuture<'_, ()> {
        (**self).write_at(offset, data, fua)
    }
    fn flush(&self) -> LunFuture<'_, ()> {
        (**self).flush()
    }
    fn settle(&self) -> LunFuture<'_, ()> {
        (**self).settle()
    }
    fn discard(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        (**self).write_zeroes(offset, len)
    }
    fn write_fenced(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        fence: Option<IoFence>,
    ) -> LunFuture<'_, ()> {
        (**self).write_fenced(offset, data, fua, fence)
    }
}

/// Checks `offset..offset+len` against `size`, overflow-safe.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), LunError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(LunError::OutOfRange { offset, len, size }),
    }
}

/// Checks that `offset` and `len` are multiples of `align` (the backend's [`Lun::alignment`]).
pub fn check_aligned(offset: u64, len: u64, align: u32) -> Result<(), LunError> {
    let a = u64::from(align.max(1));
    if offset.is_multiple_of(a) && len.is_multiple_of(a) {
        Ok(())
    } else {
        Err(LunError::Misaligned { offset, len, align })
    }
}
