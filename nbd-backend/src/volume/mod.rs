//! Exports over the cluster volume: every regular file of a csv-core [`Volume`], named by its
//! path relative to the volume root (`vms/a.vhd`); `.vhd` files are served decoded, others raw.
//!
//! [`VolumeExports`] is the [`ExportProvider`] and [`ConnectionEvents`] hook the node daemon
//! gives the [`crate::NbdServer`]. All connections to one file on this node share one
//! [`device::VolumeDevice`] (one volume handle, one VHD allocation state), so `CAN_MULTI_CONN`
//! holds.
//!
//! # Write ownership and the live-migration handoff
//!
//! Besides the file's data lock (`data:<ino>`, which the volume layer takes and breaks for
//! coherence, also for FUSE readers), an export has an **owner lock** (`nbd-owner:<ino>`) held
//! by the one node whose NBD clients may write it:
//! 1. the first write-type request on a device *claims* the export: it takes the owner lock
//!    (if another node holds it, it asks for a break and waits), then the exclusive data lock
//!    (its fencing token guards every commit), then re-reads a VHD's metadata;
//! 2. the holder learns of the break request from the change feed (or its periodic scan) and
//!    *hands over*: it revokes writes on every connection to the export and drains the writes
//!    in flight, revokes the device and its volume handle (no write through it can take the
//!    data lock again), commits pending extents through Raft and flushes the LUN, releases the
//!    data lock, then the owner lock;
//! 3. the claimant's acquisition then succeeds and it sees every write the holder
//!    acknowledged (the lock grant is followed by a linearizable reload).
//!
//! Invariants: at most one node's device for an export is owned at a time (the owner lock);
//! a device writes only while owned and never after it was revoked; INFO never claims
//! (claiming happens on writes, and [`VolumeExports::claim`] for `migrate`). A node that
//! loses its session revokes its owned devices: their clients must reconnect.
//! New connections after a handoff get a fresh device, which claims again on its first write.
//!
//! # Read-only exports
//!
//! A file without any write permission bit (`chmod a-w`, e.g. a golden image or an installer
//! ISO) is exported read-only: the handshake advertises `NBD_FLAG_READ_ONLY`, writes are
//! refused with `EPERM` before they reach the volume, and the file is opened without write
//! access (it never claims ownership). The mode is read when a connection opens the export, so
//! a `chmod` applies to new connections.

mod backing;
mod device;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use csv_core::meta::{FencingToken, FileKind, Ino, LockMode, MetaError, ROOT_INO, SessionId};
use csv_core::op::{Op, Response};
use csv_core::volume::{Applied, Consistency, MetaClient, MetaClientError, Volume, VolumeError};
use thiserror::Error;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

pub use backing::VolumeBacking;
use device::VolumeDevice;

use crate::connection::{ConnectionEvents, ConnectionHandle, ConnectionId};
use crate::export::{BlockDevice, BoxFuture, ExportError, ExportProvider, OpenPurpose};
use crate::server::chain;

/// The owner lock of an export's file.
pub fn owner_key(ino: Ino) -> String {
    format!("nbd-owner:{ino}")
}

fn owner_ino(key: &str) -> Option<Ino> {
    key.strip_prefix("nbd-owner:")?.parse().ok()
}

/// Tunables of the volume exports.
#[derive(Debug, Clone)]
pub struct ExportsConfig {
    /// How long a claim waits for the current owner to hand over.
    pub claim_wait: Duration,
    /// How often owned exports are checked for break requests and session loss (besides the
    /// change feed).
    pub scan_interval: Duration,
    /// Directory levels LIST descends.
    pub max_depth: usize,
    /// Names LIST returns at most.
    pub max_listed: usize,
}

impl Default for ExportsConfig {
    fn default() -> Self {
        Self {
            claim_wait: Duration::from_secs(60),
            scan_interval: Duration::from_millis(100),
            max_depth: 16,
            max_listed: 10_000,
        }
    }
}

/// An ownership change failed.
#[derive(Debug, Error)]
pub enum OwnershipError {
    #[error("cannot open export {name:?}")]
    Open {
        name: String,
        #[source]
        source: ExportError,
    },
    #[error("the metadata service failed the ownership change")]
    Meta(#[source] MetaClientError),
    #[error("taking the file's exclusive data lock failed")]
    DataLock(#[source] VolumeError),
    #[error("the owner of inode {ino} did not hand it over within {waited:?}")]
    Timeout { ino: Ino, waited: Duration },
    #[error("writes to this export were revoked on this connection")]
    Revoked,
    #[error("re-reading the file after the handoff failed")]
    Reload(#[source] std::io::Error),
    #[error("re-reading the VHD after the handoff failed")]
    Decode(#[source] Box<ExportError>),
}

/// The outcome of a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// From the start of the claim until this node owned the export (lock grants included).
    pub elapsed: Duration,
    /// The fencing token of this node's exclusive data lock.
    pub token: FencingToken,
    /// Another node held the export and handed it over.
    pub handed_over: bool,
}

/// One live connection, as `csvctl export list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub id: ConnectionId,
    pub export: String,
    pub peer: String,
    /// The connection's device owns the export (its writes go through).
    pub owner: bool,
    pub writes_revoked: bool,
    pub in_flight: usize,
}

/// One export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub ino: Ino,
    pub size: u64,
    /// No write permission bit: served read-only.
    pub read_only: bool,
}

struct Owned {
    device: Arc<VolumeDevice>,
    session: SessionId,
}

struct Conn {
    handle: ConnectionHandle,
    device: Weak<VolumeDevice>,
}

pub(crate) struct Inner {
    volume: Volume,
    meta: Arc<dyn MetaClient>,
    cfg: ExportsConfig,
    /// The device new connections to a file get (not revoked).
    devices: Mutex<HashMap<Ino, Weak<VolumeDevice>>>,
    /// Devices by the export name they were last opened under (to attach connections).
    by_name: Mutex<HashMap<String, Weak<VolumeDevice>>>,
    owned: Mutex<HashMap<Ino, Owned>>,
    conns: Mutex<HashMap<ConnectionId, Conn>>,
    open_serial: tokio::sync::Mutex<()>,
    /// Held from an owner-lock acquisition until its outcome is recorded in `owned`, and
    /// while releasing an owner lock this node's session holds without owning the export
    /// ([`Inner::release_lost_owner`]): so a lock granted to a claim in progress is never
    /// taken for a lost one.
    claim_gate: tokio::sync::Mutex<()>,
    me: Weak<Inner>,
}

/// The volume's files as NBD exports, with write ownership. Cheap to clone.
#[derive(Clone)]
pub struct VolumeExports {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VolumeExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeExports").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Splits an export name into path components; `None` if it is not a plain relative path.
fn components(name: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = name.split('/').collect();
    let plain = !name.is_empty()
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..");
    plain.then_some(parts)
}

impl VolumeExports {
    /// Serves `volume`'s files; `meta` is the same metadata client the volume uses (for the
    /// owner locks and the change feed). Starts the background task that answers handoff
    /// requests; it ends when the last clone is dropped. Must be called inside a runtime.
    pub fn new(volume: Volume, meta: Arc<dyn MetaClient>, cfg: ExportsConfig) -> Self {
        let feed = meta.subscribe();
        let inner = Arc::new_cyclic(|me| Inner {
            volume,
            meta,
            cfg,
            devices: Mutex::new(HashMap::new()),
            by_name: Mutex::new(HashMap::new()),
            owned: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            open_serial: tokio::sync::Mutex::new(()),
            claim_gate: tokio::sync::Mutex::new(()),
            me: me.clone(),
        });
        tokio::spawn(watch(Arc::downgrade(&inner), feed));
        Self { inner }
    }

    /// Every regular file, with its inode and size, sorted by name.
    pub async fn exports(&self) -> Result<Vec<ExportInfo>, VolumeError> {
        self.inner.walk().await
    }

    /// Live connections on this node.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let mut out: Vec<ConnectionInfo> = lock(&self.inner.conns)
            .iter()
            .map(|(id, c)| {
                let dev = c.device.upgrade();
                ConnectionInfo {
                    id: *id,
                    export: c.handle.export().to_owned(),
                    peer: c.handle.peer().to_owned(),
                    owner: dev.as_ref().is_some_and(|d| d.owned()),
                    writes_revoked: c.handle.writes_revoked()
                        || dev.as_ref().is_some_and(|d| d.revoked()),
                    in_flight: c.handle.in_flight(),
                }
            })
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }

    /// Export names this node owns (its clients may write them).
    pub fn owned(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.inner.owned)
            .values()
            .map(|o| o.device.name.clone())
            .collect();
        v.sort();
        v
    }

    /// Takes ownership of `name` for this node now (the `migrate --to` side): the current
    /// owner hands over as it would for a write here, and this node keeps the export ready
    /// for its clients.
    pub async fn claim(&self, name: &str) -> Result<Claim, OwnershipError> {
        let dev = self
            .inner
            .open_device(name)
            .await
            .map_err(open_failed(name))?;
        self.inner.claim_device(&dev).await
    }

    /// Hands `name` over (as if another node asked): for tests and for draining a node.
    pub async fn release(&self, name: &str) -> Result<bool, OwnershipError> {
        let (_, ino, _) = self.inner.resolve(name).await.map_err(open_failed(name))?;
        Ok(self.inner.hand_over(ino).await)
    }
}

/// Maps a failure to open export `name` for an ownership change.
fn open_failed(name: &str) -> impl FnOnce(ExportError) -> OwnershipError + '_ {
    move |source| OwnershipError::Open {
        name: name.to_owned(),
        source,
    }
}

/// A file without any write permission bit is exported read-only.
fn read_only_perm(perm: u32) -> bool {
    perm & 0o222 == 0
}

impl Inner {
    /// The file named `name`: (name, inode, read-only).
    async fn resolve(&self, name: &str) -> Result<(String, Ino, bool), ExportError> {
        let not_found = || ExportError::NotFound(name.to_owned());
        let parts = components(name).ok_or_else(not_found)?;
        let mut ino = ROOT_INO;
        let mut kind = FileKind::Dir;
        let mut perm = 0;
        for p in parts {
            if kind != FileKind::Dir {
                return Err(not_found());
            }
            let attr = match self.volume.lookup(ino, p).await {
                Ok(a) => a,
                Err(VolumeError::Meta(MetaError::NotFound | MetaError::NotDir)) => {
                    return Err(not_found());
                }
                Err(e) => {
                    return Err(ExportError::Open {
                        name: name.to_owned(),
                        source: backing::to_io(e),
                    });
                }
            };
            ino = attr.ino;
            kind = attr.kind;
            perm = attr.perm;
        }
        if kind != FileKind::File {
            return Err(not_found());
        }
        Ok((name.to_owned(), ino, read_only_perm(perm)))
    }

    /// The device for `name` that new connections get (opened if needed).
    async fn open_device(&self, name: &str) -> Result<Arc<VolumeDevice>, ExportError> {
        let (name, ino, read_only) = self.resolve(name).await?;
        let _g = self.open_serial.lock().await;
        if let Some(dev) = lock(&self.devices).get(&ino).and_then(Weak::upgrade)
            && !dev.revoked()
            && dev.read_only() == read_only
        {
            lock(&self.by_name).insert(name, Arc::downgrade(&dev));
            return Ok(dev);
        }
        let open_err = |e: VolumeError| ExportError::Open {
            name: name.clone(),
            source: backing::to_io(e),
        };
        let (file, attr) = self
            .volume
            .open_file(ino, !read_only)
            .await
            .map_err(open_err)?;
        let backing = Arc::new(VolumeBacking::new(self.volume.clone(), file, attr.size));
        let vhd = name.to_ascii_lowercase().ends_with(".vhd");
        let decoded = crate::export::device_for_file(backing.clone(), &name, read_only).await?;
        let dev = Arc::new(VolumeDevice::new(
            name.clone(),
            backing,
            decoded,
            vhd,
            read_only,
            self.me.clone(),
        ));
        lock(&self.devices).retain(|_, w| w.strong_count() > 0);
        lock(&self.devices).insert(ino, Arc::downgrade(&dev));
        let mut by_name = lock(&self.by_name);
        by_name.retain(|_, w| w.strong_count() > 0);
        by_name.insert(name, Arc::downgrade(&dev));
        Ok(dev)
    }

    /// Makes `dev` this node's owned device for its file (see the module docs).
    pub(crate) async fn claim_device(&self, dev: &VolumeDevice) -> Result<Claim, OwnershipError> {
        let t0 = Instant::now();
        // Another local device owning the same file hands over first (e.g. a migrate-claimed
        // device replaced meanwhile).
        let other_local = lock(&self.owned)
            .get(&dev.ino)
            .is_some_and(|o| !std::ptr::eq(Arc::as_ptr(&o.device), dev));
        if other_local {
            self.hand_over(dev.ino).await;
        }
        let _c = dev.claim.lock().await;
        if dev.revoked() {
            return Err(OwnershipError::Revoked);
        }
        if dev.owned() {
            let token = dev
                .backing
                .file()
                .lock_for_write()
                .await
                .map_err(OwnershipError::DataLock)?;
            return Ok(Claim {
                elapsed: t0.elapsed(),
                token,
                handed_over: false,
            });
        }
        let key = owner_key(dev.ino);
        let deadline = t0 + self.cfg.claim_wait;
        let mut handed_over = false;
        let (session, gate) = loop {
            let gate = self.claim_gate.lock().await;
            match self.meta.acquire(&key, LockMode::Exclusive).await {
                Ok((_, session)) => break (session, gate),
                Err(MetaClientError::Meta(MetaError::LockBusy { .. })) => {
                    drop(gate);
                    handed_over = true;
                    self.meta
                        .request_break(&key)
                        .await
                        .map_err(OwnershipError::Meta)?;
                    self.wait_free(&key, deadline).await?;
                }
                Err(MetaClientError::NoSession) => {
                    drop(gate);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(OwnershipError::Meta(e)),
            }
            if Instant::now() >= deadline {
                return Err(OwnershipError::Timeout {
                    ino: dev.ino,
                    waited: self.cfg.claim_wait,
                });
            }
        };
        let Some(me) = self.me.upgrade() else {
            return Err(OwnershipError::Revoked);
        };
        let device = lock(&me.devices).get(&dev.ino).and_then(Weak::upgrade);
        let Some(device) = device.filter(|d| std::ptr::eq(Arc::as_ptr(d), dev)) else {
            // The device was replaced while we waited: give the lock back.
            let _ = self.meta.release(session, &key).await;
            return Err(OwnershipError::Revoked);
        };
        lock(&self.owned).insert(
            dev.ino,
            Owned {
                device: device.clone(),
                session,
            },
        );
        drop(gate);
        dev.set_owned(true);
        let taken = async {
            let token = dev
                .backing
                .file()
                .lock_for_write()
                .await
                .map_err(OwnershipError::DataLock)?;
            dev.reload().await?;
            Ok::<_, OwnershipError>(token)
        }
        .await;
        let token = match taken {
            Ok(t) => t,
            Err(e) => {
                dev.set_owned(false);
                lock(&self.owned).remove(&dev.ino);
                let _ = self.meta.release(session, &key).await;
                return Err(e);
            }
        };
        let elapsed = t0.elapsed();
        info!(export = %dev.name, ino = dev.ino, token, ?elapsed, handed_over, "NBD export claimed");
        Ok(Claim {
            elapsed,
            token,
            handed_over,
        })
    }

    /// Polls until nobody else holds `key` (the holder hands over), re-asking now and then.
    async fn wait_free(&self, key: &str, deadline: Instant) -> Result<(), OwnershipError> {
        let mut asked = Instant::now();
        loop {
            let info = self
                .meta
                .lock_info(key, Consistency::Local)
                .await
                .map_err(OwnershipError::Meta)?;
            let session = self.meta.session();
            let held = info.is_some_and(|i| i.holders.iter().any(|h| Some(h.session) != session));
            if !held || Instant::now() >= deadline {
                return Ok(());
            }
            if asked.elapsed() > Duration::from_secs(1) {
                self.meta
                    .request_break(key)
                    .await
                    .map_err(OwnershipError::Meta)?;
                asked = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Hands this node's ownership of `ino` over (see the module docs). Returns whether it
    /// owned it.
    async fn hand_over(&self, ino: Ino) -> bool {
        let owned = lock(&self.owned)
            .get(&ino)
            .map(|o| (o.device.clone(), o.session));
        let Some((dev, session)) = owned else {
            self.release_lost_owner(ino).await;
            return false;
        };
        let _c = dev.claim.lock().await;
        if !dev.owned() {
            return false;
        }
        let t0 = Instant::now();
        let conns: Vec<ConnectionHandle> = lock(&self.conns)
            .values()
            .filter(|c| std::ptr::eq(c.device.as_ptr(), Arc::as_ptr(&dev)))
            .map(|c| c.handle.clone())
            .collect();
        for c in &conns {
            c.revoke_writes();
        }
        for c in &conns {
            c.drain_writes().await;
        }
        dev.revoke();
        dev.set_owned(false);
        let drained = t0.elapsed();
        if let Err(e) = dev.backing.file().surrender().await {
            warn!(export = %dev.name, error = %chain(&e), "write-back during the handoff failed");
        }
        if let Err(e) = self.meta.release(session, &owner_key(ino)).await {
            warn!(export = %dev.name, error = %chain(&e), "releasing the owner lock failed");
        }
        lock(&self.owned).remove(&ino);
        lock(&self.devices).retain(|_, w| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(&dev)));
        info!(export = %dev.name, ino, connections = conns.len(), ?drained, elapsed = ?t0.elapsed(), "NBD export handed over");
        true
    }

    /// Releases the owner lock of `ino` if this node's session holds it although this node
    /// does not own the export, and another node asked for it: a claim whose acquisition
    /// answer was lost (its proposal timed out, then committed) or whose release failed.
    /// Nothing here writes under such a lock, and until it is released every claim of the
    /// export elsewhere waits out `claim_wait`.
    async fn release_lost_owner(&self, ino: Ino) {
        let key = owner_key(ino);
        let _gate = self.claim_gate.lock().await;
        if lock(&self.owned).contains_key(&ino) {
            return;
        }
        let (Some(session), me) = (self.meta.session(), self.meta.node_id()) else {
            return;
        };
        let lost = matches!(
            self.meta.lock_info(&key, Consistency::Local).await,
            Ok(Some(info)) if info.break_requested_by.is_some_and(|n| n != me)
                && info.holders.iter().any(|h| h.session == session)
        );
        if !lost {
            return;
        }
        warn!(
            ino,
            session,
            "releasing an owner lock this node's session holds without owning the export (a claim whose answer was lost)"
        );
        if let Err(e) = self.meta.release(session, &key).await {
            warn!(ino, error = %chain(&e), "releasing a lost owner lock failed");
        }
    }

    /// Drops ownership of devices whose session is gone: the lock went with it.
    fn revoke_lost(&self) {
        let session = self.meta.session();
        let lost: Vec<Arc<VolumeDevice>> = {
            let mut owned = lock(&self.owned);
            let gone: Vec<Ino> = owned
                .iter()
                .filter(|(_, o)| Some(o.session) != session)
                .map(|(i, _)| *i)
                .collect();
            gone.iter()
                .filter_map(|i| owned.remove(i))
                .map(|o| o.device)
                .collect()
        };
        for dev in lost {
            warn!(export = %dev.name, "session lost: writes to the export revoked on this node");
            for c in lock(&self.conns).values() {
                if std::ptr::eq(c.device.as_ptr(), Arc::as_ptr(&dev)) {
                    c.handle.revoke_writes();
                }
            }
            dev.revoke();
            dev.set_owned(false);
            lock(&self.devices).retain(|_, w| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(&dev)));
        }
    }

    async fn walk(&self) -> Result<Vec<ExportInfo>, VolumeError> {
        let mut out = Vec::new();
        let mut dirs: Vec<(Ino, String, usize)> = vec![(ROOT_INO, String::new(), 0)];
        while let Some((dir, prefix, depth)) = dirs.pop() {
            let mut after: Option<String> = None;
            loop {
                let page = self.volume.readdir(dir, after.as_deref(), 512).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.name.clone());
                for e in page {
                    let path = format!("{prefix}{}", e.name);
                    match e.kind {
                        FileKind::File if out.len() < self.cfg.max_listed => {
                            let attr = match self.volume.getattr_local(e.ino).await {
                                Ok(a) => a,
                                Err(_) => continue,
                            };
                            out.push(ExportInfo {
                                name: path,
                                ino: e.ino,
                                size: attr.size,
                                read_only: read_only_perm(attr.perm),
                            });
                        }
                        FileKind::Dir if depth < self.cfg.max_depth => {
                            dirs.push((e.ino, format!("{path}/"), depth + 1));
                        }
                        _ => {}
                    }
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// Answers handoff requests for owned exports, marks readers' VHD metadata stale when another
/// node commits to the file, and revokes ownership lost with the session.
async fn watch(inner: Weak<Inner>, mut feed: broadcast::Receiver<Applied>) {
    let interval = match inner.upgrade() {
        Some(i) => i.cfg.scan_interval,
        None => return,
    };
    loop {
        let mut wanted: Vec<Ino> = Vec::new();
        let mut scan = false;
        let mut lagged = false;
        let mut stale: Option<Ino> = None;
        tokio::select! {
            msg = feed.recv() => match msg {
                Ok(Applied { op: Op::RequestBreak { key, requester }, response: Response::Ok }) => {
                    if let Some(ino) = owner_ino(&key) {
                        let me = inner.upgrade().map(|i| i.meta.node_id());
                        if me.is_some_and(|m| m != requester) {
                            wanted.push(ino);
                        }
                    }
                }
                Ok(Applied { op: Op::CommitWrite { ino, session, .. }, .. }) => {
                    let mine = inner.upgrade().and_then(|i| i.meta.session());
                    if mine != Some(session) {
                        stale = Some(ino);
                    }
                }
                Ok(Applied { op: Op::SetAttr { ino, size: Some(_), .. }, .. }) => stale = Some(ino),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    scan = true;
                    lagged = true;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tokio::time::sleep(interval) => scan = true,
        }
        let Some(inner) = inner.upgrade() else { return };
        if let Some(ino) = stale
            && let Some(dev) = lock(&inner.devices).get(&ino).and_then(Weak::upgrade)
        {
            dev.mark_stale();
        }
        if lagged {
            // Commits were missed: any file may have changed under a reader.
            for dev in lock(&inner.devices).values().filter_map(Weak::upgrade) {
                dev.mark_stale();
            }
        }
        if scan {
            inner.revoke_lost();
            let me = inner.meta.node_id();
            let owned: Vec<Ino> = lock(&inner.owned).keys().copied().collect();
            for ino in owned {
                match inner
                    .meta
                    .lock_info(&owner_key(ino), Consistency::Local)
                    .await
                {
                    Ok(Some(info)) if info.break_requested_by.is_some_and(|n| n != me) => {
                        wanted.push(ino);
                    }
                    Ok(_) => {}
                    Err(e) => debug!(ino, error = %e, "owner lock query failed"),
                }
            }
        }
        for ino in wanted {
            let inner = inner.clone();
            tokio::spawn(async move {
                inner.hand_over(ino).await;
            });
        }
    }
}

impl ExportProvider for VolumeExports {
    fn list(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            match self.inner.walk().await {
                Ok(v) => v.into_iter().map(|e| e.name).collect(),
                Err(e) => {
                    warn!(error = %chain(&e), "listing the volume's files failed");
                    Vec::new()
                }
            }
        })
    }

    fn open<'a>(
        &'a self,
        name: &'a str,
        _purpose: OpenPurpose,
    ) -> BoxFuture<'a, Result<Arc<dyn BlockDevice>, ExportError>> {
        // INFO and GO open the same shared device; only writes claim ownership.
        Box::pin(async move {
            let dev = self.inner.open_device(name).await?;
            Ok(dev as Arc<dyn BlockDevice>)
        })
    }
}

impl ConnectionEvents for VolumeExports {
    fn opened(&self, conn: &ConnectionHandle) {
        let device = lock(&self.inner.by_name)
            .get(conn.export())
            .cloned()
            .unwrap_or_default();
        lock(&self.inner.conns).insert(
            conn.id(),
            Conn {
                handle: conn.clone(),
                device,
            },
        );
    }

    fn closed(&self, conn: &ConnectionHandle) {
        lock(&self.inner.conns).remove(&conn.id());
    }
}
