//! What the server serves: the seams between the NBD protocol and storage.
//!
//! * [`BackingFile`]: a byte-addressable file (a file on the cluster volume in the daemon,
//!   [`FileBacking`] over a local `std::fs::File` here).
//! * [`BlockDevice`]: what one export looks like to a client (a raw file via [`RawDevice`], or a
//!   decoded VHD from [`crate::vhd`]).
//! * [`ExportProvider`]: resolves export names to devices and lists them.
//!
//! Invariants: the server checks every request against `BlockDevice::size()` before calling the
//! device (overflow-safe), so devices only see in-range requests. Every connection to the same
//! export must get a device sharing one backing (and, for VHD, one allocation state): that is what
//! makes `CAN_MULTI_CONN` true, since a FLUSH on any connection flushes the shared backing.

use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use csv_core::lun::{Cached, ZeroCopy};
use thiserror::Error;

use crate::proto::{STATE_HOLE, STATE_ZERO};
use crate::vhd::VhdError;

/// A boxed, `Send` future: keeps the traits dyn-compatible.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// 1 MiB of zeros, for writing zeros without allocating.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// A byte-addressable file an export is built on.
///
/// Contract: `read_at` returns exactly `len` bytes (bytes past the end of the file read as
/// zeros); `write_at` past the end extends the file and the gap reads as zeros; `flush` makes
/// every write that completed before it durable (for all users of this backing).
pub trait BackingFile: Send + Sync + 'static {
    /// Current size in bytes.
    fn size(&self) -> u64;
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>>;
    /// `len` bytes at `offset` taken without a copy (spliced into a pipe or viewed in a
    /// mapping, as `how` says), when the backing can do that right now without waiting for a
    /// device; `None`: use [`BackingFile::read_at`].
    fn read_cached(&self, offset: u64, len: usize, how: ZeroCopy) -> BoxFuture<'_, Option<Cached>> {
        let _ = (offset, len, how);
        Box::pin(async { None })
    }
    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>>;
    fn flush(&self) -> BoxFuture<'_, io::Result<()>>;
    /// Truncates or extends (with zeros) to `new_size`.
    fn set_size(&self, new_size: u64) -> BoxFuture<'_, io::Result<()>>;

    /// Whether [`BackingFile::punch_hole`] deallocates cheaply (rather than writing zeros).
    fn punches_holes(&self) -> bool {
        false
    }

    /// Makes `[offset, offset+len)` read as zeros, deallocating it if possible. The default
    /// writes zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(write_zero_bytes(self, offset, len))
    }

    /// Allocation map of `[offset, offset+len)` as consecutive `(offset, len, allocated)`
    /// ranges. The default reports everything allocated.
    fn allocated_ranges(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, io::Result<Vec<(u64, u64, bool)>>> {
        Box::pin(async move { Ok(vec![(offset, len, true)]) })
    }
}

/// One piece of a READ result, in offset order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    Data {
        offset: u64,
        data: Bytes,
    },
    /// Reads as zeros and is unallocated (sent as `OFFSET_HOLE` with structured replies).
    Hole {
        offset: u64,
        len: u32,
    },
}

/// One `base:allocation` extent: a length and `STATE_HOLE`/`STATE_ZERO` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

/// How a WRITE_ZEROES may be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroMode {
    /// The client allows deallocation (`NBD_CMD_FLAG_NO_HOLE` clear).
    pub may_trim: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail with [`DeviceError::FastZeroUnsupported`] instead of
    /// doing it slowly, before changing anything.
    pub fast_only: bool,
    /// Durable before the reply.
    pub fua: bool,
}

/// A device failed to carry out a request.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("range {offset}+{len} lies beyond the end of the device ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the export is read-only")]
    ReadOnly,
    #[error("write access to the export was revoked")]
    Revoked,
    #[error("the range cannot be zeroed faster than by writing")]
    FastZeroUnsupported,
    #[error("VHD block allocation failed")]
    Allocate(#[source] io::Error),
    #[error("backing file I/O failed")]
    Io(#[source] io::Error),
}

/// What a connection serves.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes, fixed for the lifetime of the device.
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// FLUSH on one connection covers writes from every connection sharing this device.
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Vec<ReadChunk>, DeviceError>>;
    /// The whole range as data taken without a copy, for a zero-copy reply (see
    /// [`BackingFile::read_cached`]); `None`: use [`BlockDevice::read`]. Devices that decode a
    /// format never do this.
    fn read_cached(&self, offset: u64, len: u32, how: ZeroCopy) -> BoxFuture<'_, Option<Cached>> {
        let _ = (offset, len, how);
        Box::pin(async { None })
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), DeviceError>>;
    fn flush(&self) -> BoxFuture<'_, Result<(), DeviceError>>;
    /// Advisory discard; contents afterwards are unspecified.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), DeviceError>>;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
    ) -> BoxFuture<'_, Result<(), DeviceError>>;
    /// `base:allocation` extents covering a prefix of `[offset, offset+len)` (at least one).
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, DeviceError>>;
    /// Prefetch hint; the default does nothing.
    fn cache(&self, _offset: u64, _len: u32) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Why an export could not be opened.
#[derive(Debug, Error)]
pub enum ExportError {
    #[error("no export named {0:?}")]
    NotFound(String),
    #[error("export {0:?} is not available to this client")]
    Denied(String),
    #[error("cannot open export {name:?}")]
    Open {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("export {name:?} is not a usable VHD")]
    Vhd {
        name: String,
        #[source]
        source: VhdError,
    },
}

/// Why the server opens an export: `Info` only reads its size and flags (it must not take
/// ownership, e.g. trigger a migration handoff); `Serve` enters transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenPurpose {
    Info,
    Serve,
}

/// Resolves export names (paths relative to the volume root, e.g. `vms/a.vhd`).
pub trait ExportProvider: Send + Sync + 'static {
    fn list(&self) -> BoxFuture<'_, Vec<String>>;
    fn open<'a>(
        &'a self,
        name: &'a str,
        purpose: OpenPurpose,
    ) -> BoxFuture<'a, Result<Arc<dyn BlockDevice>, ExportError>>;
}

/// Builds the device for a file: `.vhd` (any case) is decoded, everything else served raw.
pub async fn device_for_file(
    backing: Arc<dyn BackingFile>,
    name: &str,
    read_only: bool,
) -> Result<Arc<dyn BlockDevice>, ExportError> {
    if name.to_ascii_lowercase().ends_with(".vhd") {
        crate::vhd::open(backing, read_only)
            .await
            .map_err(|source| ExportError::Vhd {
                name: name.to_owned(),
                source,
            })
    } else {
        let size = backing.size();
        Ok(Arc::new(RawDevice::new(backing, size, read_only)))
    }
}

/// Writes zeros over `[offset, offset+len)` in 1 MiB pieces, never allocating `len` bytes.
pub(crate) async fn write_zero_bytes<B: BackingFile + ?Sized>(
    backing: &B,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let mut pos = offset;
    let end = offset.saturating_add(len);
    while pos < end {
        let n = (end - pos).min(ZEROS.len() as u64) as usize;
        backing
            .write_at(pos, Bytes::from_static(&ZEROS[..n]))
            .await?;
        pos += n as u64;
    }
    Ok(())
}

/// Zeroes a range of `backing` as `mode` allows (shared by raw and VHD devices).
pub(crate) async fn zero_range(
    backing: &dyn BackingFile,
    offset: u64,
    len: u64,
    mode: ZeroMode,
) -> Result<(), DeviceError> {
    if mode.may_trim && backing.punches_holes() {
        backing
            .punch_hole(offset, len)
            .await
            .map_err(DeviceError::Io)
    } else if mode.fast_only {
        Err(DeviceError::FastZeroUnsupported)
    } else {
        write_zero_bytes(backing, offset, len)
            .await
            .map_err(DeviceError::Io)
    }
}

/// A raw file (or a fixed VHD's data region) served byte for byte: `[0, size)` of the backing.
pub struct RawDevice {
    backing: Arc<dyn BackingFile>,
    size: u64,
    read_only: bool,
}

impl RawDevice {
    pub fn new(backing: Arc<dyn BackingFile>, size: u64, read_only: bool) -> Self {
        Self {
            backing,
            size,
            read_only,
        }
    }

    fn writable(&self) -> Result<(), DeviceError> {
        if self.read_only {
            Err(DeviceError::ReadOnly)
        } else {
            Ok(())
        }
    }

    async fn flush_if(&self, fua: bool) -> Result<(), DeviceError> {
        if fua {
            self.backing.flush().await.map_err(DeviceError::Io)?;
        }
        Ok(())
    }
}

impl BlockDevice for RawDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Vec<ReadChunk>, DeviceError>> {
        Box::pin(async move {
            let data = self
                .backing
                .read_at(offset, len as usize)
                .await
                .map_err(DeviceError::Io)?;
            Ok(vec![ReadChunk::Data { offset, data }])
        })
    }

    fn read_cached(&self, offset: u64, len: u32, how: ZeroCopy) -> BoxFuture<'_, Option<Cached>> {
        self.backing.read_cached(offset, len as usize, how)
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            self.writable()?;
            self.backing
                .write_at(offset, data)
                .await
                .map_err(DeviceError::Io)?;
            self.flush_if(fua).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move { self.backing.flush().await.map_err(DeviceError::Io) })
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            self.writable()?;
            // Advisory: only worth doing when the backing really deallocates.
            if self.backing.punches_holes() {
                self.backing
                    .punch_hole(offset, len)
                    .await
                    .map_err(DeviceError::Io)?;
            }
            self.flush_if(fua).await
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
    ) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            self.writable()?;
            zero_range(self.backing.as_ref(), offset, len, mode).await?;
            self.flush_if(mode.fua).await
        })
    }

    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, DeviceError>> {
        Box::pin(async move {
            let ranges = self
                .backing
                .allocated_ranges(offset, len as u64)
                .await
                .map_err(DeviceError::Io)?;
            Ok(ranges
                .into_iter()
                .filter(|(_, l, _)| *l > 0)
                .map(|(_, l, allocated)| Extent {
                    len: l.min(u32::MAX as u64) as u32,
                    flags: if allocated {
                        0
                    } else {
                        STATE_HOLE | STATE_ZERO
                    },
                })
                .collect())
        })
    }
}

/// [`BackingFile`] over a local file (tests, the example server). Blocking calls run on
/// tokio's blocking pool; holes are punched with `fallocate` and found with `SEEK_DATA`.
pub struct FileBacking {
    file: Arc<std::fs::File>,
    size: AtomicU64,
}

impl FileBacking {
    pub fn new(file: std::fs::File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self {
            file: Arc::new(file),
            size: AtomicU64::new(size),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&std::fs::File) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(io::Error::other)?
    }
}

/// `lseek(fd, pos, whence)`; `Ok(None)` for `ENXIO` (no data/hole at or after `pos`).
fn seek(file: &std::fs::File, pos: u64, whence: i32) -> io::Result<Option<u64>> {
    let pos = i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek only reads its integer arguments; the fd is owned by `file`, which is
    // borrowed for the duration of the call. We never use the fd's file position elsewhere
    // (all I/O is positional), so moving it is harmless.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

impl BackingFile for FileBacking {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_cached(&self, offset: u64, len: usize, how: ZeroCopy) -> BoxFuture<'_, Option<Cached>> {
        // Past the end of the file nothing is cached, so such a range is never spliced. A
        // plain file can shrink under a mapping, so it is spliced only, never mapped.
        Box::pin(async move {
            match how {
                ZeroCopy::Splice => {
                    csv_core::lun::pipe::splice_cached(&self.file, offset, len).map(Cached::Pipe)
                }
                ZeroCopy::Map => None,
            }
        })
    }

    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(self.blocking(move |f| {
            let mut buf = vec![0u8; len];
            let mut done = 0;
            while done < len {
                match f.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break, // past EOF: the rest stays zero
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(Bytes::from(buf))
        }))
    }

    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let end = offset.saturating_add(data.len() as u64);
            self.blocking(move |f| f.write_all_at(&data, offset))
                .await?;
            self.size.fetch_max(end, Ordering::AcqRel);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.blocking(|f| f.sync_data()))
    }

    fn set_size(&self, new_size: u64) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.blocking(move |f| f.set_len(new_size)).await?;
            self.size.store(new_size, Ordering::Release);
            Ok(())
        })
    }

    fn punches_holes(&self) -> bool {
        true
    }

    fn punch_hole(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            };
            let punched = self
                .blocking(move |f| {
                    // SAFETY: fallocate only reads its integer arguments; the fd stays valid
                    // because `f` borrows the owning File for the whole call.
                    let r = unsafe {
                        libc::fallocate(
                            f.as_raw_fd(),
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            off,
                            l,
                        )
                    };
                    if r == 0 {
                        Ok(true)
                    } else {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                            Ok(false)
                        } else {
                            Err(e)
                        }
                    }
                })
                .await?;
            if !punched {
                write_zero_bytes(self, offset, len).await?;
            }
            Ok(())
        })
    }

    fn allocated_ranges(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, io::Result<Vec<(u64, u64, bool)>>> {
        Box::pin(self.blocking(move |f| {
            let end = offset.saturating_add(len);
            let mut out = Vec::new();
            let mut pos = offset;
            while pos < end {
                let data = match seek(f, pos, libc::SEEK_DATA) {
                    Ok(Some(d)) => d.min(end),
                    Ok(None) => end,
                    // SEEK_DATA unsupported: everything is data.
                    Err(_) => {
                        out.push((pos, end - pos, true));
                        break;
                    }
                };
                if data > pos {
                    out.push((pos, data - pos, false));
                    pos = data;
                    continue;
                }
                let hole = seek(f, pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
                let hole = hole.max(pos + 1);
                out.push((pos, hole - pos, true));
                pos = hole;
            }
            Ok(out)
        }))
    }
}
