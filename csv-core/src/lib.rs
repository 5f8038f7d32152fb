//! csv-core: the bottom of csvd. Types, the [`lun::Lun`] trait and its backends,
//! the on-LUN superblock, and the metadata model shared by the metadata service
//! and the protocol frontends. It knows nothing of Raft or FUSE; its only network code
//! is the NBD *client* in [`lun::nbd`] that reaches the LUN over a SAN path (tokio only),
//! and [`ports`], which chooses listening ports for servers started a moment later.

pub mod lun;
pub mod meta;
pub mod op;
pub mod ports;
pub mod superblock;
pub mod volume;

/// Locks `m`; a poisoned lock is used as it is (no critical section in this crate leaves its
/// state inconsistent when it panics, and I/O paths must not panic in turn).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
