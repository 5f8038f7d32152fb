//! [`Mapped`]: LUN bytes as a view into a read-only shared mapping of the LUN file, for NBD
//! read replies that cost the server one copy instead of two.
//!
//! A copied 1 MiB READ costs the server two copies: page cache into a buffer (`preadv2`), and
//! the buffer into the socket (`writev`). A spliced one costs none, but reaches a loopback
//! client as one socket fragment per 4 KiB page, which some CPUs receive at 0.6x the rate of
//! copied replies (docs/benchmarks.md). A mapped one is handed to `writev` straight from the
//! mapping: the socket layer copies the page-cache pages once, into the same large fragments
//! as a copied reply, and there is no `preadv2` and no buffer.
//!
//! Invariants:
//! - the LUN is mapped `PROT_READ`, `MAP_SHARED`, in [`WINDOW`]-sized windows (at most
//!   [`WINDOWS_KEPT`] mapped at once, least recently used unmapped first, and any unused for
//!   [`WINDOW_IDLE`], each only once no [`Mapped`] refers to it): address space and page
//!   tables stay bounded whatever the LUN's size, and pages are mapped only while reads use
//!   them (mapped pages are out of reach of `drop_caches` and harder to reclaim);
//! - a view is made only of a range inside one window whose pages are all in the page cache
//!   (`cachestat(2)`), so handing it to the kernel does not wait for the device;
//! - **no user-space code reads the mapped bytes**: a view only yields `IoSlice`s for
//!   `writev`. Should a page be evicted after the check and its read-back fail, the kernel's
//!   copy then fails with `EFAULT` (a fault in a system call is an error, not a signal), and
//!   the connection ends; a user-space read would instead have taken `SIGBUS`;
//! - like a spliced page, a view shows the page's content when the kernel copies it: at least
//!   as new as when the read started (see [`crate::lun::pipe`] for why a reused block shows a
//!   client nothing it could not read anyway).

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lock;

/// Bytes of the LUN one mapping covers (aligned to its own size in the LUN).
pub const WINDOW: u64 = 64 << 20;
/// Windows kept mapped: 4 GiB of address space, at most 8 MiB of page tables.
pub const WINDOWS_KEPT: usize = 64;
/// A window unused this long is unmapped. Its pages stay in the page cache, but while they
/// are mapped `drop_caches` and `POSIX_FADV_DONTNEED` leave them there and reclaim treats
/// them as in use, so a mapping must not outlive the reads it serves by much.
pub const WINDOW_IDLE: Duration = Duration::from_secs(2);

/// One read-only shared mapping of `len` bytes of the LUN file.
#[derive(Debug)]
struct Window {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and lives until the window drops; the pointer is only ever
// given to the kernel (see the module invariants), so sharing it between threads shares no
// Rust-visible mutable state.
unsafe impl Send for Window {}
// SAFETY: as for `Send`: nothing reads or writes through the pointer in user space.
unsafe impl Sync for Window {}

impl Window {
    fn map(file: &File, offset: u64, len: usize) -> io::Result<Window> {
        // SAFETY: a fresh mapping (null hint) of an open descriptor; the kernel validates
        // the offset (page aligned, as WINDOW is) and length and reports errors as MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Window { ptr, len })
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: exactly the region `map` created; no view refers to it any more (every
        // `Mapped` holds an `Arc` of its window).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `len` bytes of the LUN as a view into a mapped window (see the module documentation).
#[derive(Debug)]
pub struct Mapped {
    window: Arc<Window>,
    start: usize,
    len: usize,
}

impl Mapped {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, for `writev` only: the kernel copies them; user space must never read
    /// through the slice (module invariants).
    pub fn io_slice(&self) -> IoSlice<'_> {
        // SAFETY: `start + len` lies inside the window (checked by `MappedLun::view` and kept
        // by `advance`), which stays mapped while `self` holds its `Arc`. The bytes may change
        // under the slice (other writers of the LUN), which is why only the kernel reads them.
        let bytes = unsafe {
            std::slice::from_raw_parts(self.window.ptr.as_ptr().add(self.start), self.len)
        };
        IoSlice::new(bytes)
    }

    /// Copies the bytes out through a socket pair, so that only the kernel reads the mapping
    /// (tests and diagnostics; the reply path hands [`Mapped::io_slice`] to `writev`).
    pub fn copy_out(&self) -> io::Result<Vec<u8>> {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair()?;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut b, &mut got).map(|_| got)
        });
        std::io::Write::write_all(&mut a, &self.io_slice())?;
        drop(a);
        reader
            .join()
            .map_err(|_| io::Error::other("copy thread panicked"))?
    }

    /// Drops the first `n` bytes (already written).
    pub fn advance(&mut self, n: usize) {
        let n = n.min(self.len);
        self.start += n;
        self.len -= n;
    }
}

/// A LUN file's windows, mapped on demand.
#[derive(Debug)]
pub struct MappedLun {
    inner: Arc<Windows>,
}

#[derive(Debug)]
struct Windows {
    file: Arc<File>,
    size: u64,
    idle: Duration,
    /// Least recently used first.
    list: Mutex<Vec<Entry>>,
    /// Whether the sweeper thread runs.
    sweeping: AtomicBool,
}

#[derive(Debug)]
struct Entry {
    idx: u64,
    window: Arc<Window>,
    used: Instant,
}

impl MappedLun {
    pub fn new(file: Arc<File>, size: u64) -> MappedLun {
        MappedLun::with_idle(file, size, WINDOW_IDLE)
    }

    /// As [`MappedLun::new`], unmapping windows unused for `idle` (tests).
    pub fn with_idle(file: Arc<File>, size: u64, idle: Duration) -> MappedLun {
        MappedLun {
            inner: Arc::new(Windows {
                file,
                size,
                idle,
                list: Mutex::new(Vec::new()),
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// `len` bytes at `offset` as a view, if the range lies in one window and every page of
    /// it is in the page cache; `None` otherwise, or on any error (the caller's ordinary read
    /// reports it if it persists).
    pub fn view(&self, offset: u64, len: usize) -> Option<Mapped> {
        let w = &self.inner;
        let end = offset.checked_add(len as u64)?;
        if len == 0 || end > w.size || offset / WINDOW != (end - 1) / WINDOW {
            return None;
        }
        if !super::zerocopy::fully_cached(&w.file, offset, len).ok()? {
            return None;
        }
        let idx = offset / WINDOW;
        let window = self.window(idx).ok()?;
        Some(Mapped {
            window,
            start: (offset - idx * WINDOW) as usize,
            len,
        })
    }

    fn window(&self, idx: u64) -> io::Result<Arc<Window>> {
        let w = &self.inner;
        let now = Instant::now();
        let mut list = lock(&w.list);
        if let Some(i) = list.iter().rposition(|e| e.idx == idx) {
            let mut entry = list.remove(i);
            entry.used = now;
            let window = entry.window.clone();
            list.push(entry);
            return Ok(window);
        }
        let start = idx * WINDOW;
        let len = (w.size - start).min(WINDOW) as usize;
        let window = Arc::new(Window::map(&w.file, start, len)?);
        if list.len() >= WINDOWS_KEPT {
            // Unmapped once the last view of it is written.
            list.remove(0);
        }
        list.push(Entry {
            idx,
            window: window.clone(),
            used: now,
        });
        drop(list);
        if !w.sweeping.swap(true, Ordering::AcqRel) {
            self.start_sweeper();
        }
        Ok(window)
    }

    /// A thread that unmaps windows idle for `idle`, and ends once the LUN is dropped.
    fn start_sweeper(&self) {
        let weak = Arc::downgrade(&self.inner);
        let period = (self.inner.idle / 2).max(Duration::from_millis(10));
        let started = std::thread::Builder::new()
            .name("csv-lun-unmap".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(period);
                    let Some(w) = weak.upgrade() else { return };
                    let now = Instant::now();
                    lock(&w.list).retain(|e| now.duration_since(e.used) < w.idle);
                }
            });
        if started.is_err() {
            // No sweeper: windows then leave only by the count limit.
            tracing::warn!("cannot start the thread that unmaps idle LUN windows");
        }
    }

    /// Windows currently kept mapped.
    pub fn windows_kept(&self) -> usize {
        lock(&self.inner.list).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn lun_with(bytes: &[u8]) -> (tempfile::TempDir, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun");
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let f = File::options().read(true).write(true).open(&path).unwrap();
        (dir, Arc::new(f))
    }

    /// What the kernel sends of a view.
    fn sent(m: &Mapped) -> Vec<u8> {
        m.copy_out().unwrap()
    }

    #[test]
    fn a_cached_range_is_viewed_without_a_copy_and_sent_intact() {
        let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        let (_d, f) = lun_with(&data);
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        let lun = MappedLun::new(f, data.len() as u64);
        let mut m = lun.view(4096 + 100, 1 << 20).expect("cached range");
        assert_eq!(m.len(), 1 << 20);
        assert!(sent(&m) == data[4196..4196 + (1 << 20)]);
        m.advance(1000);
        assert!(sent(&m) == data[5196..4196 + (1 << 20)]);
        // The last window is as long as the LUN allows.
        let tail = lun.view(data.len() as u64 - 10, 10).expect("tail");
        assert!(sent(&tail) == data[data.len() - 10..]);
    }

    #[test]
    fn a_view_shows_later_writes_to_the_same_pages() {
        let (_d, f) = lun_with(&[1u8; 8192]);
        let lun = MappedLun::new(f.clone(), 8192);
        let m = lun.view(0, 8192).expect("cached");
        f.write_all_at(&[2u8; 4096], 4096).unwrap();
        let got = sent(&m);
        assert!(got[..4096].iter().all(|b| *b == 1));
        assert!(got[4096..].iter().all(|b| *b == 2));
    }

    #[test]
    fn uncached_straddling_empty_and_out_of_range_requests_get_no_view() {
        let data = vec![7u8; 4 << 20];
        let (_d, f) = lun_with(&data);
        // SAFETY: plain advisory call on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let lun = MappedLun::new(f.clone(), 200 << 20);
        assert!(lun.view(0, 1 << 20).is_none(), "not in the page cache");
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(lun.view(0, 1 << 20).is_some());
        assert!(lun.view(0, 0).is_none());
        assert!(lun.view(u64::MAX - 5, 10).is_none());
        assert!(lun.view((200 << 20) - 4096, 8192).is_none(), "past the LUN");
        assert!(lun.view(WINDOW - 4096, 8192).is_none(), "two windows");
    }

    /// The module's safety argument: when the pages behind a view are gone (here the file is
    /// truncated under it; in production a page evicted and failing to read back), the
    /// kernel's copy fails with an error, and the process takes no `SIGBUS`.
    #[test]
    fn a_view_whose_pages_are_gone_fails_the_write_with_an_error_not_a_signal() {
        let (_d, f) = lun_with(&[5u8; 1 << 20]);
        let lun = MappedLun::new(f.clone(), 1 << 20);
        let m = lun.view(0, 1 << 20).expect("cached");
        f.set_len(0).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let iov = m.io_slice();
        // SAFETY: one valid iovec (the view, mapped while `m` lives) and an open socket.
        let n = unsafe { libc::writev(a.as_raw_fd(), (&raw const iov).cast(), 1) };
        let err = io::Error::last_os_error();
        assert_eq!(
            n, -1,
            "nothing can be sent from pages past the end of the file"
        );
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
    }

    /// Idle windows are unmapped, after which their pages can leave the page cache again
    /// (while mapped, `POSIX_FADV_DONTNEED` cannot drop them).
    #[test]
    fn idle_windows_are_unmapped_and_their_pages_can_be_dropped_again() {
        let (_d, f) = lun_with(&[3u8; 1 << 20]);
        let lun = MappedLun::with_idle(f.clone(), 1 << 20, Duration::from_millis(200));
        let m = lun.view(0, 1 << 20).expect("cached");
        assert!(
            sent(&m).iter().all(|b| *b == 3),
            "pages touched through the mapping"
        );
        drop(m);
        assert_eq!(lun.windows_kept(), 1);
        let dontneed = || {
            // SAFETY: plain advisory call on an open descriptor.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        };
        dontneed();
        assert!(
            super::super::zerocopy::fully_cached(&f, 0, 1 << 20).unwrap(),
            "mapped pages stay cached"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while lun.windows_kept() > 0 {
            assert!(
                Instant::now() < deadline,
                "the idle window was never unmapped"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        dontneed();
        assert!(
            !super::super::zerocopy::fully_cached(&f, 0, 1 << 20).unwrap(),
            "unmapped, the pages can be dropped"
        );
        // And a new view maps the window again.
        let mut back = vec![0u8; 1 << 20];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(lun.view(0, 4096).is_some());
        assert_eq!(lun.windows_kept(), 1);
    }

    #[test]
    fn windows_are_bounded_and_unmapped_only_when_no_view_remains() {
        let size = WINDOW * (WINDOWS_KEPT as u64 + 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        // One cached page at the start of every window (a sparse file's holes read as zeros).
        for i in 0..(WINDOWS_KEPT as u64 + 2) {
            f.write_all_at(&[i as u8; 4096], i * WINDOW).unwrap();
        }
        let lun = MappedLun::new(Arc::new(File::open(&path).unwrap()), size);
        let first = lun.view(0, 4096).expect("window 0");
        for i in 1..(WINDOWS_KEPT as u64 + 2) {
            let m = lun.view(i * WINDOW, 4096).expect("cached page");
            assert!(sent(&m).iter().all(|b| *b == i as u8));
            assert!(lun.windows_kept() <= WINDOWS_KEPT);
        }
        // Window 0 left the list but stays mapped for the view that still refers to it.
        assert!(sent(&first).iter().all(|b| *b == 0));
        assert_eq!(lun.windows_kept(), WINDOWS_KEPT);
    }
}
