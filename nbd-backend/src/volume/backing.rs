//! [`VolumeBacking`]: a [`BackingFile`] over one csv-core [`OpenFile`].
//!
//! Thin: every call goes to the volume layer, which owns locking, the ordered write path and
//! coherence across nodes. `flush` is `OpenFile::fsync`: pending extents are committed through
//! Raft and the LUN is flushed before it returns, so FLUSH and FUA replies imply durability.
//! The size is cached (the device's geometry is fixed while it is served) and refreshed
//! explicitly after an ownership change.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use csv_core::lun::{Cached, ZeroCopy};
use csv_core::meta::{FallocMode, Ino, MetaError};
use csv_core::volume::{OpenFile, Volume, VolumeError};

use crate::export::{BackingFile, BoxFuture};

/// One file of the volume, opened read-write by this node.
pub struct VolumeBacking {
    volume: Volume,
    file: OpenFile,
    size: AtomicU64,
}

impl VolumeBacking {
    pub fn new(volume: Volume, file: OpenFile, size: u64) -> Self {
        Self {
            volume,
            file,
            size: AtomicU64::new(size),
        }
    }

    pub fn ino(&self) -> Ino {
        self.file.ino()
    }

    /// The volume handle underneath (for revocation, the data lock and its token).
    pub fn file(&self) -> &OpenFile {
        &self.file
    }

    /// Re-reads the size from the volume (after another node may have changed it).
    pub async fn refresh_size(&self) -> io::Result<u64> {
        let attr = self.volume.getattr(self.ino()).await.map_err(to_io)?;
        self.size.store(attr.size, Ordering::Release);
        Ok(attr.size)
    }
}

/// Volume errors as I/O errors: the errno the NBD edge needs (`ENOSPC`, `EFBIG`, `EPERM`)
/// where one applies, else the error itself (mapped to `EIO`).
pub(crate) fn to_io(e: VolumeError) -> io::Error {
    let code = match &e {
        VolumeError::Meta(MetaError::NoSpace) => Some(libc::ENOSPC),
        VolumeError::Meta(MetaError::FileTooBig) => Some(libc::EFBIG),
        VolumeError::WriteRevoked(_) => Some(libc::EPERM),
        _ => None,
    };
    match code {
        Some(c) => {
            tracing::debug!(error = %e, "volume refused an NBD request");
            io::Error::from_raw_os_error(c)
        }
        None => io::Error::other(e),
    }
}

impl BackingFile for VolumeBacking {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(async move {
            let data = self.file.read(offset, len).await.map_err(to_io)?;
            if data.len() == len {
                return Ok(data);
            }
            // Past the end of the file: the rest reads as zeros.
            let mut buf = BytesMut::zeroed(len);
            buf[..data.len()].copy_from_slice(&data);
            Ok(buf.freeze())
        })
    }

    fn read_cached(&self, offset: u64, len: usize, how: ZeroCopy) -> BoxFuture<'_, Option<Cached>> {
        Box::pin(async move { self.file.read_cached(offset, len, how).await.ok().flatten() })
    }

    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let end = offset.saturating_add(data.len() as u64);
            self.file.write(offset, data).await.map_err(to_io)?;
            self.size.fetch_max(end, Ordering::AcqRel);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { self.file.fsync().await.map_err(to_io) })
    }

    fn set_size(&self, new_size: u64) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.file.set_len(new_size).await.map_err(to_io)?;
            self.size.store(new_size, Ordering::Release);
            Ok(())
        })
    }

    fn punches_holes(&self) -> bool {
        true
    }

    fn punch_hole(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            // Past the end there is nothing to punch (and punching never extends).
            let size = self.size();
            let end = offset.saturating_add(len).min(size);
            if offset >= end {
                return Ok(());
            }
            self.file
                .fallocate(offset, end - offset, FallocMode::PunchHole)
                .await
                .map_err(to_io)?;
            Ok(())
        })
    }

    fn allocated_ranges(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, io::Result<Vec<(u64, u64, bool)>>> {
        Box::pin(async move {
            let end = offset.saturating_add(len);
            let mut out = Vec::new();
            let mut pos = offset;
            while pos < end {
                let data = match self.file.seek_data(pos).await.map_err(to_io)? {
                    Some(d) => d.min(end),
                    None => end,
                };
                if data > pos {
                    out.push((pos, data - pos, false));
                    pos = data;
                    continue;
                }
                let hole = self
                    .file
                    .seek_hole(pos)
                    .await
                    .map_err(to_io)?
                    .unwrap_or(end)
                    .clamp(pos + 1, end);
                out.push((pos, hole - pos, true));
                pos = hole;
            }
            Ok(out)
        })
    }
}
