//! [`Pipe`]: LUN bytes held as page-cache references, for zero-copy NBD read replies.
//!
//! A 1 MiB NBD read costs the server two copies: page cache into a buffer (`preadv2`), and the
//! buffer into the socket (`writev`). With `splice(2)` the page-cache pages themselves go into
//! a pipe and from the pipe into the socket: the server copies nothing and the client's own
//! `recv` is the only copy left.
//!
//! Invariants:
//! - a pipe is filled only from pages that are already in the page cache (checked with
//!   `cachestat(2)`): filling never waits for the device, so it may run on any thread, and a
//!   SAN path that hangs can never hang it;
//! - a filled pipe holds exactly the bytes asked for, or the fill fails and the pipe is
//!   dropped (never returned to the pool with stale bytes in it);
//! - the pages are referenced, not copied: what the client receives is the page's content when
//!   the socket layer (or, over loopback, the client's `recv`) copies it. That is at least as
//!   new as the content when the read started, and a later overwrite of the same LUN block can
//!   show through. NBD leaves reads that overlap concurrent writes undefined, and every NBD
//!   client of a node may read every file on the volume, so a reused block shows a client
//!   nothing it could not read anyway. (If exports ever get per-client access control, freed
//!   blocks must not be reused while a splice may still reference them.)
//! - pipes are pooled (most recently used first, at most [`PIPES_KEPT`] idle) and only when
//!   empty.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

use bytes::{Bytes, BytesMut};

use super::zerocopy::fully_cached;
use crate::lock;

/// Bytes one pipe can hold: `/proc/sys/fs/pipe-max-size` by default, and one 1 MiB NBD read.
pub const PIPE_BYTES: usize = 1 << 20;
/// Idle pipes kept for reuse (two descriptors each).
pub const PIPES_KEPT: usize = 64;
const PAGE: u64 = 4096;

/// A pipe holding `len` bytes spliced from a file.
#[derive(Debug)]
pub struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
    len: usize,
}

impl Pipe {
    /// A non-blocking pipe with room for [`PIPE_BYTES`] bytes (one page per slot).
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own; no pointers involved.
        let got = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES as i32) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        if (got as usize) < PIPE_BYTES {
            return Err(io::Error::other("pipe smaller than asked for"));
        }
        Ok(Pipe { rd, wr, len: 0 })
    }

    /// An empty pipe from the pool, or a new one.
    pub fn take() -> io::Result<Pipe> {
        if let Some(p) = lock(pool()).pop() {
            return Ok(p);
        }
        Pipe::new()
    }

    /// Returns an empty pipe to the pool; a pipe that still holds bytes is closed.
    pub fn give_back(self) {
        if self.len == 0 {
            let mut free = lock(pool());
            if free.len() < PIPES_KEPT {
                free.push(self);
            }
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `len` bytes at `offset` fit one pipe (a slot per page touched).
    fn fits(offset: u64, len: usize) -> bool {
        let first = offset / PAGE;
        let last = (offset + len as u64).div_ceil(PAGE);
        len > 0 && (last - first) * PAGE <= PIPE_BYTES as u64
    }

    /// Splices `len` bytes of `file` at `offset` into this empty pipe, if every page of the
    /// range is in the page cache. `Ok(false)`: some page is not (nothing was spliced).
    /// An error leaves the pipe unusable; drop it.
    fn fill_if_cached(&mut self, file: &File, offset: u64, len: usize) -> io::Result<bool> {
        if self.len != 0 || !Pipe::fits(offset, len) {
            return Ok(false);
        }
        if !fully_cached(file, offset, len)? {
            return Ok(false);
        }
        let mut off = offset as libc::loff_t;
        while self.len < len {
            // SAFETY: valid descriptors; `off` is a live loff_t the kernel advances.
            let n = unsafe {
                libc::splice(
                    file.as_raw_fd(),
                    &mut off,
                    self.wr.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - self.len,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            match n {
                n if n > 0 => self.len += n as usize,
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ => return Err(io::Error::last_os_error()),
            }
        }
        Ok(true)
    }

    /// Moves up to `max` held bytes into `fd` (a socket) without blocking; returns how many.
    /// `WouldBlock` when the socket is full.
    pub fn splice_to(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let want = self.len.min(max);
        if want == 0 {
            return Ok(0);
        }
        // SAFETY: valid descriptors; null offsets (pipe and socket have none).
        let n = unsafe {
            libc::splice(
                self.rd.as_raw_fd(),
                std::ptr::null_mut(),
                fd,
                std::ptr::null_mut(),
                want,
                libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.len -= n as usize;
        Ok(n as usize)
    }

    /// Copies the held bytes out (for a destination that cannot take a splice).
    pub fn drain(&mut self) -> io::Result<Bytes> {
        let mut out = BytesMut::zeroed(self.len);
        let mut got = 0;
        while got < out.len() {
            // SAFETY: the destination is the unfilled tail of `out`, valid for its length.
            let n = unsafe {
                libc::read(
                    self.rd.as_raw_fd(),
                    out[got..].as_mut_ptr().cast(),
                    out.len() - got,
                )
            };
            match n {
                n if n > 0 => got += n as usize,
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ => return Err(io::Error::last_os_error()),
            }
        }
        self.len = 0;
        Ok(out.freeze())
    }
}

/// `len` bytes of `file` at `offset` in a pipe, if they are all in the page cache (see
/// [`Pipe::fill_if_cached`]); `None` otherwise, or on any error (the caller's ordinary read
/// reports it if it persists).
pub fn splice_cached(file: &File, offset: u64, len: usize) -> Option<Pipe> {
    if !Pipe::fits(offset, len) {
        return None;
    }
    let mut pipe = Pipe::take().ok()?;
    match pipe.fill_if_cached(file, offset, len) {
        Ok(true) => Some(pipe),
        Ok(false) => {
            pipe.give_back();
            None
        }
        // Dropped, not pooled: it may hold part of the range.
        Err(_) => None,
    }
}

fn pool() -> &'static Mutex<Vec<Pipe>> {
    static POOL: OnceLock<Mutex<Vec<Pipe>>> = OnceLock::new();
    POOL.get_or_init(|| Mutex::new(Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        // Clean pages, so that POSIX_FADV_DONTNEED can drop them.
        f.sync_all().unwrap();
        drop(f);
        (dir, File::open(&path).unwrap())
    }

    #[test]
    fn a_cached_range_is_spliced_and_drained_intact() {
        let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        let (_d, f) = file_with(&data);
        let mut buf = vec![0u8; data.len()];
        f.read_exact_at(&mut buf, 0).unwrap(); // into the page cache
        let mut p = Pipe::take().unwrap();
        assert!(p.fill_if_cached(&f, 4096 + 100, 500_000).unwrap());
        assert_eq!(p.len(), 500_000);
        assert_eq!(&p.drain().unwrap()[..], &data[4196..4196 + 500_000]);
        assert!(p.is_empty());
        // A full pipe's worth, page aligned.
        assert!(p.fill_if_cached(&f, 1 << 20, PIPE_BYTES).unwrap());
        assert_eq!(&p.drain().unwrap()[..], &data[1 << 20..2 << 20]);
        p.give_back();
    }

    #[test]
    fn ranges_not_in_the_cache_or_wider_than_a_pipe_are_refused_without_splicing() {
        let data = vec![7u8; 4 << 20];
        let (_d, f) = file_with(&data);
        // SAFETY: plain advisory call on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut p = Pipe::take().unwrap();
        assert!(!p.fill_if_cached(&f, 0, 1 << 20).unwrap());
        assert!(p.is_empty());
        let mut buf = vec![0u8; data.len()];
        f.read_exact_at(&mut buf, 0).unwrap();
        // One byte more than a pipe, or a pipe's worth that straddles one extra page.
        assert!(!p.fill_if_cached(&f, 0, PIPE_BYTES + 1).unwrap());
        assert!(!p.fill_if_cached(&f, 1, PIPE_BYTES).unwrap());
        assert!(!p.fill_if_cached(&f, 0, 0).unwrap());
        assert!(p.fill_if_cached(&f, 0, PIPE_BYTES).unwrap());
    }

    #[test]
    fn spliced_bytes_reach_a_socket_intact() {
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 253) as u8).collect();
        let (_d, f) = file_with(&data);
        let mut buf = vec![0u8; data.len()];
        f.read_exact_at(&mut buf, 0).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut b, &mut got).unwrap();
            got
        });
        let mut p = Pipe::take().unwrap();
        assert!(p.fill_if_cached(&f, 0, data.len()).unwrap());
        while !p.is_empty() {
            match p.splice_to(a.as_raw_fd(), usize::MAX) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        drop(a);
        assert_eq!(reader.join().unwrap(), data);
        p.give_back();
    }
}
