//! Nemeses: what injects and heals each fault kind on a real cluster.
//!
//! A [`Nemesis`] declares the kinds it handles; [`registry`] picks one per requested kind
//! and refuses, before anything starts, the kinds no nemesis of this build handles (with
//! what they are waiting for). New fault modules plug in as further `Nemesis`
//! implementations listed in [`registry`].
//!
//! Invariant: every fault that [`Nemesis::inject`] started is healed by
//! [`Nemesis::heal`]; [`Nemesis::heal_all`] also undoes anything a crashed run may have
//! left (a stopped process, a dead node) so that the cluster can converge.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::schedule::{FaultKind, LeaderAction, PlannedFault, SplitMix64};
use crate::client::CtlClient;
use crate::cluster::{self, Children, ClusterFile};

/// What a nemesis failed to do.
#[derive(Debug, thiserror::Error)]
pub enum NemesisError {
    #[error("fault kind {kind} is not available in this build yet: {needs}")]
    Unavailable {
        kind: FaultKind,
        needs: &'static str,
    },
    #[error("cannot find the leader to hit within {0:?}")]
    NoLeader(Duration),
    #[error("node {node} (pid {pid}) did not die within {timeout:?}")]
    NotDead {
        node: u64,
        pid: u32,
        timeout: Duration,
    },
    #[error("cannot restart node {node}")]
    Restart {
        node: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot talk to the cluster")]
    Cluster(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("no node {0} in this cluster")]
    NoNode(u64),
    #[error("nemesis for {kind} cannot handle this fault: {why}")]
    Unsupported { kind: FaultKind, why: String },
}

/// The cluster as the nemeses act on it: its directory and file, and the processes this
/// harness started (restarted nodes become its children).
pub struct ClusterControl {
    pub dir: PathBuf,
    pub file: ClusterFile,
    pub children: Children,
    pub csvd: PathBuf,
}

impl ClusterControl {
    pub fn client(&self) -> Result<CtlClient, NemesisError> {
        self.file
            .client()
            .map_err(|e| NemesisError::Cluster(e.into()))
    }

    fn pid(&self, node: u64) -> Result<u32, NemesisError> {
        self.file
            .nodes
            .iter()
            .find(|n| n.id == node)
            .map(|n| n.pid)
            .ok_or(NemesisError::NoNode(node))
    }

    /// SIGKILL a node, abort its FUSE connection (a crashed machine takes its mounts with
    /// it), and wait until every thread of the process is gone.
    ///
    /// The abort is needed on one host: a killed daemon whose invalidation thread is blocked
    /// in the kernel (`fuse_reverse_inval_entry` waits for a directory lock that a client's
    /// `unlink` holds while it waits for the dead daemon's answer) never exits, keeps its
    /// Raft store locked and cannot be restarted.
    pub async fn kill(&mut self, node: u64) -> Result<(), NemesisError> {
        let pid = self.pid(node)?;
        cluster::signal(pid, libc::SIGCONT);
        cluster::signal(pid, libc::SIGKILL);
        if let Some(e) = self.file.nodes.iter().find(|n| n.id == node) {
            abort_fuse(&e.mount);
        }
        let timeout = Duration::from_secs(10);
        let deadline = Instant::now() + timeout;
        loop {
            self.children.reap();
            if !cluster::pid_alive(pid) && threads_gone(pid) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(NemesisError::NotDead { node, pid, timeout });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a stopped node again from its configuration.
    pub fn restart(&mut self, node: u64) -> Result<(), NemesisError> {
        let entry = self
            .file
            .nodes
            .iter()
            .find(|n| n.id == node)
            .ok_or(NemesisError::NoNode(node))?;
        cluster::unmount_if_mounted(&entry.mount);
        let pid =
            cluster::start_node(&self.dir, node, &self.csvd, &mut self.children).map_err(|e| {
                NemesisError::Restart {
                    node,
                    source: e.into(),
                }
            })?;
        for n in self.file.nodes.iter_mut().filter(|n| n.id == node) {
            n.pid = pid;
        }
        self.file
            .save(&self.dir)
            .map_err(|e| NemesisError::Restart {
                node,
                source: e.into(),
            })
    }

    pub fn is_alive(&self, node: u64) -> bool {
        self.pid(node).map(cluster::pid_alive).unwrap_or(false)
    }

    pub fn node_ids(&self) -> Vec<u64> {
        self.file.nodes.iter().map(|n| n.id).collect()
    }

    /// The leader most answering nodes agree on, waiting up to `timeout`.
    pub async fn leader(&self, timeout: Duration) -> Result<u64, NemesisError> {
        let client = self.client()?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut votes: std::collections::BTreeMap<u64, usize> = Default::default();
            for (_, s) in client.statuses(Duration::from_millis(500)).await {
                if let Some(l) = s.and_then(|s| s.leader) {
                    *votes.entry(l).or_default() += 1;
                }
            }
            if let Some((l, _)) = votes.into_iter().max_by_key(|(_, v)| *v) {
                return Ok(l);
            }
            if Instant::now() > deadline {
                return Err(NemesisError::NoLeader(timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Aborts the FUSE connection of the mount at `mount` and detaches it (`umount2` with
/// `MNT_FORCE | MNT_DETACH`: FUSE aborts the connection on a forced unmount, failing every
/// request waiting on it). Nothing happens if nothing is mounted there.
fn abort_fuse(mount: &Path) {
    if !cluster::is_mounted(mount) {
        return;
    }
    let Ok(c) = std::ffi::CString::new(mount.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call; umount2 has no
    // other memory-safety preconditions.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_FORCE | libc::MNT_DETACH) };
    if rc != 0 {
        tracing::warn!(mount = %mount.display(), error = %std::io::Error::last_os_error(), "aborting a killed node's FUSE mount");
    }
}

/// True when no thread of `pid` is left but zombies (a killed process whose leader exited
/// can keep threads blocked in the kernel, holding its files).
fn threads_gone(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.trim().chars().next())
            })
            .is_none_or(|st| matches!(st, 'Z' | 'X'))
    })
}

/// A fault in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveFault {
    pub kind: FaultKind,
    pub node: Option<u64>,
    /// What was done, for the report ("kill -9", "SIGSTOP").
    pub action: &'static str,
    /// For an instantaneous fault (done when `inject` returns, nothing to heal): what it
    /// did, for the report.
    pub note: String,
    /// For an instantaneous fault: the stall it measured itself (a migration's handoff).
    pub stall_s: Option<f64>,
}

/// Injects and heals some fault kinds.
pub trait Nemesis: Send {
    fn kinds(&self) -> &'static [FaultKind];

    /// Starts `fault`; returns what it hit.
    fn inject<'a>(
        &'a mut self,
        fault: &'a PlannedFault,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<ActiveFault, NemesisError>>;

    /// Ends a fault this nemesis started.
    fn heal<'a>(
        &'a mut self,
        fault: &'a ActiveFault,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<(), NemesisError>>;

    /// Undoes every fault of its kinds that may still be in effect.
    fn heal_all<'a>(
        &'a mut self,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<(), NemesisError>>;
}

/// Process faults: kill -9 / restart, SIGSTOP / SIGCONT, and either on the leader.
#[derive(Debug, Default)]
pub struct ProcessNemesis;

impl ProcessNemesis {
    async fn hit(
        cluster: &mut ClusterControl,
        kind: FaultKind,
        node: u64,
        kill: bool,
    ) -> Result<ActiveFault, NemesisError> {
        if kill {
            cluster.kill(node).await?;
        } else {
            cluster::signal(cluster.pid(node)?, libc::SIGSTOP);
        }
        Ok(ActiveFault {
            kind,
            node: Some(node),
            action: if kill { "kill -9" } else { "SIGSTOP" },
            note: String::new(),
            stall_s: None,
        })
    }
}

impl Nemesis for ProcessNemesis {
    fn kinds(&self) -> &'static [FaultKind] {
        &[FaultKind::Kill, FaultKind::Pause, FaultKind::Leader]
    }

    fn inject<'a>(
        &'a mut self,
        fault: &'a PlannedFault,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<ActiveFault, NemesisError>> {
        Box::pin(async move {
            match (fault.kind, fault.node) {
                (FaultKind::Kill, Some(n)) => Self::hit(cluster, fault.kind, n, true).await,
                (FaultKind::Pause, Some(n)) => Self::hit(cluster, fault.kind, n, false).await,
                (FaultKind::Leader, _) => {
                    let leader = cluster.leader(Duration::from_secs(10)).await?;
                    let kill = fault.leader_action != Some(LeaderAction::Pause);
                    Self::hit(cluster, fault.kind, leader, kill).await
                }
                (kind, node) => Err(NemesisError::Unsupported {
                    kind,
                    why: format!("target {node:?}"),
                }),
            }
        })
    }

    fn heal<'a>(
        &'a mut self,
        fault: &'a ActiveFault,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<(), NemesisError>> {
        Box::pin(async move {
            let Some(node) = fault.node else {
                return Ok(());
            };
            if fault.action == "SIGSTOP" {
                cluster::signal(cluster.pid(node)?, libc::SIGCONT);
                Ok(())
            } else {
                cluster.restart(node)
            }
        })
    }

    fn heal_all<'a>(
        &'a mut self,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<(), NemesisError>> {
        Box::pin(async move {
            for node in cluster.node_ids() {
                if cluster.is_alive(node) {
                    cluster::signal(cluster.pid(node)?, libc::SIGCONT);
                } else {
                    cluster.restart(node)?;
                }
            }
            Ok(())
        })
    }
}

/// Live migration: moves the NBD write ownership of one of the nbd workload's exports
/// (one with a writing client) to another live node with `csvctl migrate`'s library call,
/// and reports the handoff time as the fault's stall. Instantaneous: the fault is over
/// when the new owner holds the export, so there is nothing to heal.
#[derive(Debug, Default)]
pub struct MigrateNemesis;

impl MigrateNemesis {
    async fn migrate(
        fault: &PlannedFault,
        cluster: &ClusterControl,
    ) -> Result<ActiveFault, NemesisError> {
        let kind = FaultKind::Migrate;
        let unsupported = |why: String| NemesisError::Unsupported { kind, why };
        let client = cluster.client()?;
        let nodes = cluster.node_ids();
        let t0 = Instant::now();
        let rows = crate::exports::list(&client, &nodes)
            .await
            .map_err(|e| NemesisError::Cluster(e.into()))?;
        let writing: Vec<_> = rows
            .iter()
            .filter(|r| r.name.starts_with(super::workload::nbd::EXPORT_DIR_PREFIX))
            .filter_map(|r| {
                let owner = r.owner_node?;
                r.clients
                    .iter()
                    .any(|c| c.owner && c.node == owner)
                    .then_some((r, owner))
            })
            .collect();
        if writing.is_empty() {
            return Err(unsupported(
                "no export of the nbd workload has a writer".into(),
            ));
        }
        // Deterministic in the schedule: the fault's start picks the export.
        let pick = SplitMix64::new(fault.at_s.to_bits()).below(writing.len() as u64);
        let (row, owner) = writing[pick as usize];
        // The target: the planned node if it is live and not the owner, else the next
        // live node after it.
        let live: Vec<u64> = client
            .statuses(Duration::from_secs(1))
            .await
            .into_iter()
            .filter(|(n, s)| *n != owner && s.as_ref().is_some_and(|s| s.session.is_some()))
            .map(|(n, _)| n)
            .collect();
        let want = fault.node.unwrap_or(owner);
        let to = live
            .iter()
            .copied()
            .find(|n| *n >= want)
            .or_else(|| live.first().copied())
            .ok_or_else(|| unsupported("no live node to migrate to".into()))?;
        let chosen_s = t0.elapsed().as_secs_f64();
        let m = crate::exports::migrate(&client, &row.name, to)
            .await
            .map_err(|e| NemesisError::Cluster(e.into()))?;
        Ok(ActiveFault {
            kind,
            node: Some(to),
            action: "migrate",
            note: format!(
                "migrate {} node {owner} -> {to}: handoff {:.1} ms (command {:.1} ms, chosen in {chosen_s:.2}s){}",
                row.name,
                m.handoff_ms,
                m.total_ms,
                if m.handed_over {
                    ""
                } else {
                    ", nothing to hand over"
                }
            ),
            stall_s: Some(m.handoff_ms / 1e3),
        })
    }
}

impl Nemesis for MigrateNemesis {
    fn kinds(&self) -> &'static [FaultKind] {
        &[FaultKind::Migrate]
    }

    fn inject<'a>(
        &'a mut self,
        fault: &'a PlannedFault,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<ActiveFault, NemesisError>> {
        Box::pin(Self::migrate(fault, cluster))
    }

    fn heal<'a>(
        &'a mut self,
        _fault: &'a ActiveFault,
        _cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<(), NemesisError>> {
        Box::pin(async { Ok(()) })
    }

    fn heal_all<'a>(
        &'a mut self,
        _cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<(), NemesisError>> {
        Box::pin(async { Ok(()) })
    }
}

/// What a fault kind that no nemesis of this build handles is waiting for.
fn needs(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::Partition => {
            "node isolation needs the fault module of the redirector I/O loop (`csvctl fault isolate/heal`)"
        }
        FaultKind::SanDown | FaultKind::SanHang | FaultKind::SanFlaky => {
            "SAN path faults need the redirector I/O loop and its fault module (`csvctl fault san-down/san-hang/san-flaky`)"
        }
        FaultKind::Kill | FaultKind::Pause | FaultKind::Leader | FaultKind::Migrate => {
            "no nemesis registered"
        }
    }
}

/// The nemeses of this build: the dispatch point for new fault modules (partition and
/// the SAN path faults plug in here as further [`Nemesis`] implementations).
fn all() -> Vec<Box<dyn Nemesis>> {
    vec![Box::new(ProcessNemesis), Box::new(MigrateNemesis)]
}

/// The nemeses needed for `kinds`, or the first kind this build cannot inject.
pub fn registry(kinds: &[FaultKind]) -> Result<Vec<Box<dyn Nemesis>>, NemesisError> {
    let mut pool = all();
    for k in kinds {
        if !pool.iter().any(|n| n.kinds().contains(k)) {
            return Err(NemesisError::Unavailable {
                kind: *k,
                needs: needs(*k),
            });
        }
    }
    pool.retain(|n| n.kinds().iter().any(|k| kinds.contains(k)));
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_and_migrate_faults_are_available_and_the_rest_are_refused_with_a_reason() {
        let ok = registry(&[FaultKind::Kill, FaultKind::Pause, FaultKind::Leader]).unwrap();
        assert_eq!(ok.len(), 1);
        let ok = registry(&[FaultKind::Kill, FaultKind::Migrate]).unwrap();
        assert_eq!(ok.len(), 2);
        for k in [
            FaultKind::Partition,
            FaultKind::SanDown,
            FaultKind::SanHang,
            FaultKind::SanFlaky,
        ] {
            let e = registry(&[FaultKind::Kill, k]).err().unwrap().to_string();
            assert!(e.contains(k.name()) && e.contains("not available"), "{e}");
        }
    }
}
