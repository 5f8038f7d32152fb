//! [`FileLun`]: the LUN as a regular file or a block device (`/dev/...`).
//!
//! All I/O is positional (`pread`/`pwrite`) and runs on tokio's blocking pool, never on
//! a worker thread. Invariants:
//! - the size is fixed at open (file length, or the device size found by seeking to its end);
//! - with `direct` (O_DIRECT) the alignment is 4096 and every buffer handed to the kernel is
//!   4096-aligned (data is copied through an aligned bounce buffer);
//! - `write_at(.., fua = true)` returns only after `fdatasync` succeeded; `flush` is `fdatasync`;
//! - `discard` punches a hole (files) or issues BLKDISCARD (block devices); a target that cannot
//!   discard is not an error, since discard is advisory;
//! - `write_zeroes` uses `fallocate(ZERO_RANGE)` and falls back to writing zeros.

use std::fs::{File, OpenOptions};
use std::io;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::{Lun, LunError, LunFuture, check_aligned, check_range};

/// Alignment (and buffer alignment) required with O_DIRECT.
pub const DIRECT_ALIGN: u32 = 4096;

/// Linux `BLKDISCARD` = `_IO(0x12, 119)` (not exported by the `libc` crate).
const BLKDISCARD: libc::c_ulong = 0x1277;

/// Largest buffer one blocking call handles for zero fallback writes.
const ZERO_STEP: u64 = 1 << 20;

/// How to open a [`FileLun`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileLunOptions {
    /// Bypass the page cache (O_DIRECT); requests must then be 4096-aligned.
    pub direct: bool,
    /// Open read-only; writes, discards and zeroing fail.
    pub read_only: bool,
}

/// A LUN backed by a regular file or a block device.
pub struct FileLun {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    opts: FileLunOptions,
    block_device: bool,
}

/// One 4096-byte, 4096-aligned block: the unit of the O_DIRECT bounce buffers.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct AlignedBlock([u8; DIRECT_ALIGN as usize]);

/// A zeroed, 4096-aligned buffer of `len` bytes (`len` a multiple of 4096).
struct AlignedBuf {
    blocks: Vec<AlignedBlock>,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        let n = len.div_ceil(DIRECT_ALIGN as usize);
        AlignedBuf {
            blocks: vec![AlignedBlock([0; DIRECT_ALIGN as usize]); n],
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `AlignedBlock` is `repr(C)` around a byte array whose size equals its
        // alignment, so the Vec's elements are contiguous initialized bytes without padding;
        // `len <= blocks.len() * 4096` by construction.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; the mutable borrow of `self` makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> LunError {
    move |source| LunError::Io { op, offset, source }
}

/// Tries a buffered read on the calling (async) thread with `RWF_NOWAIT`: it succeeds only
/// when the page cache serves it without blocking. `None` (would block, unsupported, short)
/// sends the caller to the blocking pool, which saves two thread hand-offs per cached read.
fn read_nowait(file: &File, buf: &mut [u8], offset: u64) -> Option<()> {
    let off = i64::try_from(offset).ok()?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` points at `buf`, valid and exclusively borrowed for the call; the fd is
    // owned by `file`, which outlives the call.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    (n >= 0 && n as usize == buf.len()).then_some(())
}

/// Like [`read_nowait`] for a buffered write; returns the bytes written (possibly fewer than
/// asked, the rest then goes through the blocking pool).
fn write_nowait(file: &File, data: &[u8], offset: u64) -> usize {
    let Ok(off) = i64::try_from(offset) else {
        return 0;
    };
    let iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: `iov` points at `data`, valid for the call (pwritev2 only reads it); the fd is
    // owned by `file`, which outlives the call.
    let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    usize::try_from(n).unwrap_or(0)
}

/// Runs a blocking closure on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    op: &'static str,
    offset: u64,
    f: impl FnOnce() -> Result<T, LunError> + Send + 'static,
) -> Result<T, LunError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(res) => res,
        Err(join) => Err(LunError::Io {
            op,
            offset,
            source: io::Error::other(join),
        }),
    }
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
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(&path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
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
        Ok(FileLun {
            file: Arc::new(file),
            path,
            size,
            opts,
            block_device,
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
    let buf = AlignedBuf::zeroed(step);
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
        if self.opts.direct { DIRECT_ALIGN } else { 512 }
    }

    fn describe(&self) -> String {
        let kind = if self.block_device {
            "blockdev"
        } else {
            "file"
        };
        let direct = if self.opts.direct { "+direct" } else { "" };
        format!("{kind}{direct}:{}", self.path.display())
    }

    fn read_at(&self, offset: u64, len: usize) -> LunFuture<'_, Bytes> {
        Box::pin(async move {
            self.check(offset, len as u64)?;
            if len == 0 {
                return Ok(Bytes::new());
            }
            let file = self.file.clone();
            let direct = self.opts.direct;
            if !direct {
                let mut buf = vec![0u8; len];
                if read_nowait(&file, &mut buf, offset).is_some() {
                    return Ok(Bytes::from(buf));
                }
            }
            blocking("read", offset, move || {
                if direct {
                    let mut buf = AlignedBuf::zeroed(len);
                    file.read_exact_at(buf.as_mut_slice(), offset)
                        .map_err(io_err("read", offset))?;
                    Ok(Bytes::copy_from_slice(buf.as_slice()))
                } else {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, offset)
                        .map_err(io_err("read", offset))?;
                    Ok(Bytes::from(buf))
                }
            })
            .await
        })
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, data.len() as u64)?;
            self.check_writable("write", offset)?;
            if data.is_empty() && !fua {
                return Ok(());
            }
            let file = self.file.clone();
            let direct = self.opts.direct;
            let (mut offset, mut data) = (offset, data);
            if !direct && !fua {
                let done = write_nowait(&file, &data, offset);
                if done == data.len() {
                    return Ok(());
                }
                offset += done as u64;
                data = data.slice(done..);
            }
            blocking("write", offset, move || {
                if direct {
                    let mut buf = AlignedBuf::zeroed(data.len());
                    buf.as_mut_slice().copy_from_slice(&data);
                    file.write_all_at(buf.as_slice(), offset)
                } else {
                    file.write_all_at(&data, offset)
                }
                .map_err(io_err("write", offset))?;
                if fua {
                    file.sync_data().map_err(io_err("write+fua sync", offset))?;
                }
                Ok(())
            })
            .await
        })
    }

    fn flush(&self) -> LunFuture<'_, ()> {
        Box::pin(async move {
            let file = self.file.clone();
            blocking("flush", 0, move || {
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
            blocking("discard", offset, move || {
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
            blocking("write_zeroes", offset, move || {
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
        let buf = AlignedBuf::zeroed(8192);
        assert_eq!(buf.as_slice().as_ptr() as usize % 4096, 0);
        assert_eq!(buf.as_slice().len(), 8192);
    }

    #[tokio::test]
    async fn read_only_lun_refuses_writes_and_reads_file_contents() {
        let (_dir, path) = make(1 << 16);
        std::fs::write(&path, vec![0x5a; 1 << 16]).unwrap();
        let lun = FileLun::open(
            &path,
            FileLunOptions {
                direct: false,
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
