//! [`VolumeDevice`]: what the connections to one volume file on this node share.
//!
//! It wraps the decoded device (raw, or a VHD from [`crate::vhd`]) over a [`VolumeBacking`] and
//! adds write ownership:
//! * the first write-type request claims ownership (the export's owner lock, then the data
//!   lock with its fencing token; see [`super`]), and a dynamic VHD's metadata is re-read
//!   right after, under the exclusive lock, so the BAT and the allocation point are the
//!   previous owner's final ones;
//! * once revoked (handed over to another node), every write-type request fails with
//!   [`DeviceError::Revoked`], and the volume handle underneath is revoked too, so nothing
//!   can take the data lock back through this device;
//! * a device that does not own the export re-reads a VHD's metadata before its next read
//!   after another node committed changes to the file (`stale`), so readers follow the
//!   owner's allocations.
//!
//! The geometry (`size`) is fixed for the device's life: the server checks requests against it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};

use bytes::Bytes;
use csv_core::lun::{Cached, ZeroCopy};
use csv_core::meta::Ino;

use super::backing::VolumeBacking;
use super::{Inner, OwnershipError};
use crate::export::{
    BackingFile, BlockDevice, BoxFuture, DeviceError, Extent, ReadChunk, ZeroMode, device_for_file,
};

pub(crate) struct VolumeDevice {
    pub ino: Ino,
    pub name: String,
    pub backing: Arc<VolumeBacking>,
    inner: RwLock<Arc<dyn BlockDevice>>,
    size: u64,
    vhd: bool,
    /// The file had no write permission bit when opened: writes are refused (never claimed).
    read_only: bool,
    /// Holds the export's ownership (owner lock + data lock) for this node.
    owned: AtomicBool,
    revoked: AtomicBool,
    stale: AtomicBool,
    /// Serialises claims, handoffs and reloads of this device.
    pub claim: tokio::sync::Mutex<()>,
    exports: Weak<Inner>,
}

impl VolumeDevice {
    pub fn new(
        name: String,
        backing: Arc<VolumeBacking>,
        inner: Arc<dyn BlockDevice>,
        vhd: bool,
        read_only: bool,
        exports: Weak<Inner>,
    ) -> Self {
        Self {
            ino: backing.ino(),
            name,
            size: inner.size(),
            backing,
            inner: RwLock::new(inner),
            vhd,
            read_only,
            owned: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            claim: tokio::sync::Mutex::new(()),
            exports,
        }
    }

    fn inner(&self) -> Arc<dyn BlockDevice> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn owned(&self) -> bool {
        self.owned.load(Ordering::SeqCst)
    }

    pub fn set_owned(&self, v: bool) {
        self.owned.store(v, Ordering::SeqCst);
    }

    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    /// Irreversibly refuses writes, here and in the volume handle underneath.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
        self.backing.file().revoke_writes();
    }

    /// Another node changed the file: a VHD's metadata must be re-read before trusting it.
    pub fn mark_stale(&self) {
        if self.vhd && !self.owned() {
            self.stale.store(true, Ordering::SeqCst);
        }
    }

    /// Re-reads the size and (for a VHD) the metadata from the volume. The caller holds
    /// `claim`.
    pub async fn reload(&self) -> Result<(), OwnershipError> {
        self.stale.store(false, Ordering::SeqCst);
        if !self.vhd {
            return Ok(());
        }
        self.backing
            .refresh_size()
            .await
            .map_err(OwnershipError::Reload)?;
        let backing: Arc<dyn BackingFile> = self.backing.clone();
        let dev = device_for_file(backing, &self.name, false)
            .await
            .map_err(|e| OwnershipError::Decode(Box::new(e)))?;
        if dev.size() != self.size {
            tracing::warn!(
                export = %self.name,
                was = self.size,
                now = dev.size(),
                "VHD virtual size changed under a served export; keeping the old geometry"
            );
        }
        match self.inner.write() {
            Ok(mut g) => *g = dev,
            Err(p) => *p.into_inner() = dev,
        }
        Ok(())
    }

    /// Makes sure this node owns the export before a write-type request.
    async fn ensure_owned(&self) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        if self.revoked() {
            return Err(DeviceError::Revoked);
        }
        if self.owned() {
            return Ok(());
        }
        let Some(exports) = self.exports.upgrade() else {
            return Err(DeviceError::Revoked);
        };
        match exports.claim_device(self).await {
            Ok(_) => Ok(()),
            Err(OwnershipError::Revoked) => Err(DeviceError::Revoked),
            Err(e) => {
                tracing::warn!(export = %self.name, error = %crate::server::chain(&e), "claiming the export for a write failed");
                Err(DeviceError::Io(std::io::Error::other(e)))
            }
        }
    }

    async fn fresh(&self) {
        if self.stale.load(Ordering::SeqCst) {
            let _c = self.claim.lock().await;
            if self.stale.load(Ordering::SeqCst)
                && !self.owned()
                && let Err(e) = self.reload().await
            {
                tracing::warn!(export = %self.name, error = %crate::server::chain(&e), "re-reading VHD metadata failed");
            }
        }
    }

    /// The error of a write-type request that reached the decoded device. A refusal
    /// (`EPERM` to the client) promises that nothing was written, so it is passed on only
    /// where it is certain: a raw export refuses before its one LUN write. A VHD write is
    /// several writes (data, bitmap, BAT), and one refused after another landed has an
    /// unknown outcome: `EIO`. Any other failure stays what it is, even on a device that
    /// has been revoked meanwhile: its write may have reached the LUN.
    fn map_err(&self, e: DeviceError) -> DeviceError {
        if self.vhd && is_refusal(&e) {
            DeviceError::Io(std::io::Error::other(
                "write access was revoked during the request; its outcome is unknown",
            ))
        } else {
            e
        }
    }
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Vec<ReadChunk>, DeviceError>> {
        Box::pin(async move {
            self.fresh().await;
            self.inner().read(offset, len).await
        })
    }

    fn read_cached(&self, offset: u64, len: u32, how: ZeroCopy) -> BoxFuture<'_, Option<Cached>> {
        Box::pin(async move {
            self.fresh().await;
            self.inner().read_cached(offset, len, how).await
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            self.ensure_owned().await?;
            let r = self.inner().write(offset, data, fua).await;
            r.map_err(|e| self.map_err(e))
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move { self.inner().flush().await })
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            self.ensure_owned().await?;
            let r = self.inner().trim(offset, len, fua).await;
            r.map_err(|e| self.map_err(e))
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
    ) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            self.ensure_owned().await?;
            let r = self.inner().write_zeroes(offset, len, mode).await;
            r.map_err(|e| self.map_err(e))
        })
    }

    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, DeviceError>> {
        Box::pin(async move {
            self.fresh().await;
            self.inner().block_status(offset, len).await
        })
    }
}

/// True for the errors the NBD edge answers with `EPERM`.
fn is_refusal(e: &DeviceError) -> bool {
    match e {
        DeviceError::Revoked | DeviceError::ReadOnly => true,
        DeviceError::Io(io) | DeviceError::Allocate(io) => io.raw_os_error() == Some(libc::EPERM),
        DeviceError::OutOfRange { .. } | DeviceError::FastZeroUnsupported => false,
    }
}
