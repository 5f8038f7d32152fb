//! Large reads of data already in the page cache, taken without copying it into a buffer:
//! how ([`ZeroCopy`]) and what comes back ([`Cached`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::mapped::Mapped;
use super::pipe::Pipe;

const PAGE: u64 = 4096;

/// How a cached range is taken for an NBD reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Referenced in a pipe and spliced into the socket: the server copies nothing
    /// ([`crate::lun::pipe`]).
    Splice,
    /// Viewed in a mapping of the LUN and handed to `writev`: the server copies once
    /// ([`crate::lun::mapped`]).
    Map,
}

/// A cached range held without a copy.
#[derive(Debug)]
pub enum Cached {
    Pipe(Pipe),
    Mapped(Mapped),
}

impl Cached {
    /// Bytes held.
    pub fn len(&self) -> usize {
        match self {
            Cached::Pipe(p) => p.len(),
            Cached::Mapped(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `struct cachestat_range` of `cachestat(2)` (Linux 6.5).
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of `cachestat(2)`.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// `cachestat(2)`'s number on every architecture (the generic syscall table).
const SYS_CACHESTAT: libc::c_long = 451;

/// Whether every page of `[offset, offset+len)` is in the page cache. Kernels without
/// `cachestat(2)` answer `false`, so nothing is taken without a copy there.
pub(crate) fn fully_cached(file: &File, offset: u64, len: usize) -> io::Result<bool> {
    let first = offset / PAGE * PAGE;
    let end = (offset + len as u64).div_ceil(PAGE) * PAGE;
    let range = CachestatRange {
        off: first,
        len: end - first,
    };
    let mut st = Cachestat::default();
    // SAFETY: both pointers refer to live, correctly laid out structs for the call's duration.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut st as *mut Cachestat,
            0u32,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(st.nr_cache == (end - first) / PAGE)
}
