//! The node's own SAN path as the redirector needs it: a [`Lun`] that can also be probed and
//! that says when every request sent on it has *resolved* (answered, or can no longer execute).
//!
//! A request that timed out may still execute on the target much later (a ghost write, see
//! [`crate::ghost`]). The redirector resolves such a request once its future has completed
//! **and** [`SanPath::settled`] has completed after that:
//! - for an [`NbdLun`], the future of a timed-out request fails with `Timeout` while the request
//!   stays tracked; `settled` is [`NbdLun::wait_resolved`], which completes when the target has
//!   answered every request sent so far or their connection is gone. A dead connection counts as
//!   resolution: on the local cluster the target is an nbdkit process on a unix socket, whose
//!   connections die only with the process or when it closes them;
//! - for other LUNs ([`PlainPath`]: files, block devices, test LUNs) a request's future completes
//!   only once the request has executed or failed, so `settled` has nothing more to wait for.

use std::sync::Arc;

use bytes::Bytes;
use csv_core::lun::{
    IoFence, Lun, LunError, LunFuture, LunOpenOptions, NbdLun, NbdOptions, open_lun,
};

/// The direct (SAN) path of a node.
pub trait SanPath: Lun {
    /// A cheap health check of the path (a small read at offset 0).
    fn probe(&self) -> LunFuture<'_, ()> {
        Box::pin(async move {
            let len = u64::from(self.alignment().max(1)).min(self.size()) as usize;
            if len > 0 {
                self.read_at(0, len).await?;
            }
            Ok(())
        })
    }

    /// Completes when every request sent on this path before the call has resolved.
    fn settled(&self) -> LunFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

impl SanPath for NbdLun {
    fn probe(&self) -> LunFuture<'_, ()> {
        Box::pin(NbdLun::probe(self))
    }

    fn settled(&self) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.wait_resolved().await;
            Ok(())
        })
    }
}

/// A path over any [`Lun`] whose request futures complete only when the request has resolved.
pub struct PlainPath<L: Lun>(pub L);

impl<L: Lun> Lun for PlainPath<L> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn alignment(&self) -> u32 {
        self.0.alignment()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn read_at(&self, offset: u64, len: usize) -> LunFuture<'_, Bytes> {
        self.0.read_at(offset, len)
    }
    fn read_cached(
        &self,
        offset: u64,
        len: usize,
        how: csv_core::lun::ZeroCopy,
    ) -> Option<csv_core::lun::Cached> {
        self.0.read_cached(offset, len, how)
    }
    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> LunFuture<'_, ()> {
        self.0.write_at(offset, data, fua)
    }
    fn flush(&self) -> LunFuture<'_, ()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        self.0.write_zeroes(offset, len)
    }
    fn write_fenced(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        fence: Option<IoFence>,
    ) -> LunFuture<'_, ()> {
        self.0.write_fenced(offset, data, fua, fence)
    }
}

impl<L: Lun> SanPath for PlainPath<L> {}

/// Opens the LUN named by `spec` (as [`open_lun`] does) as a [`SanPath`]: NBD targets keep their
/// resolution tracking, anything else is a [`PlainPath`].
pub async fn open_san_path(
    spec: &str,
    opts: &LunOpenOptions,
) -> Result<Arc<dyn SanPath>, LunError> {
    if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
        let nbd: NbdOptions = opts.nbd;
        return Ok(Arc::new(NbdLun::connect(spec, nbd).await?));
    }
    Ok(Arc::new(PlainPath(open_lun(spec, opts).await?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use csv_core::lun::MemLun;

    #[tokio::test]
    async fn a_plain_path_probes_with_a_small_read_and_is_always_settled() {
        let p = PlainPath(MemLun::new(1 << 16));
        p.probe().await.unwrap();
        p.settled().await.unwrap();
        let empty = PlainPath(MemLun::new(0));
        empty.probe().await.unwrap();
    }
}
