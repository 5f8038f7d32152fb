//! Nemeses: what injects and heals each fault kind on a real cluster.
//!
//! A [`Nemesis`] declares the kinds it handles; [`registry`] picks one per requested kind
//! and refuses, before anything starts, the kinds no nemesis of this build handles.
//! [`ClusterNeeds`] says what the cluster must offer for the requested kinds (an nbdkit
//! SAN path per node for `san-*`, a network namespace per node for `partition`), so a
//! cluster the harness starts has it and a given one without it is refused up front.
//!
//! - [`ProcessNemesis`]: kill, pause, leader (signals to csvd);
//! - [`MigrateNemesis`]: migrate (a live NBD export handoff; instantaneous);
//! - [`SanNemesis`]: san-down, san-hang, san-flaky (node K's nbdkit, through [`crate::fault`]);
//! - [`PartitionNemesis`]: partition (neighbour blackholes between namespaces, through
//!   [`crate::netns`]).
//!
//! Invariant: every fault that [`Nemesis::inject`] started is healed by
//! [`Nemesis::heal`]; [`Nemesis::heal_all`] also undoes anything a crashed run may have
//! left (a stopped process, a dead node, a failed SAN path, a cut link) so that the
//! cluster can converge.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::schedule::{FaultKind, LeaderAction, PlannedFault, SplitMix64};
use crate::client::CtlClient;
use crate::cluster::{self, Children, ClusterFile, SanMode};
use crate::fault::Fault;
use crate::redirect::{DiagReply, DiagRequest};

/// What a nemesis failed to do.
#[derive(Debug, thiserror::Error)]
pub enum NemesisError {
    #[error("fault kind {kind} is not available in this build: no nemesis injects it")]
    Unavailable { kind: FaultKind },
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
    #[error("cannot {what} on node {node}")]
    Inject {
        what: String,
        node: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot change the LAN links")]
    Lan(#[source] Box<dyn std::error::Error + Send + Sync>),
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

    /// Ends a fault this nemesis started; returns what it observed of the fault's effect
    /// (for the report; empty if nothing).
    fn heal<'a>(
        &'a mut self,
        fault: &'a ActiveFault,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<String, NemesisError>>;

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
    ) -> BoxFuture<'a, Result<String, NemesisError>> {
        Box::pin(async move {
            let Some(node) = fault.node else {
                return Ok(String::new());
            };
            if fault.action == "SIGSTOP" {
                cluster::signal(cluster.pid(node)?, libc::SIGCONT);
            } else {
                cluster.restart(node)?;
            }
            Ok(String::new())
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
        // Right after a fault (a writer's node killed, say) the workload's clients may still be
        // reconnecting: wait for one that writes, as other faults wait for ready nodes.
        let rows = loop {
            let rows = crate::exports::list(&client, &nodes)
                .await
                .map_err(|e| NemesisError::Cluster(e.into()))?;
            if rows.iter().any(|r| writer_of(r).is_some()) {
                break rows;
            }
            if t0.elapsed() >= WRITER_WAIT {
                return Err(unsupported(format!(
                    "no export of the nbd workload has had a writer for {:.0}s",
                    WRITER_WAIT.as_secs_f64()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let writing: Vec<_> = rows
            .iter()
            .filter_map(|r| writer_of(r).map(|owner| (r, owner)))
            .collect();
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

/// How long the migrate nemesis waits for an export of the nbd workload with a writer.
const WRITER_WAIT: Duration = Duration::from_secs(10);

/// The owner node of `row`, if it is an export of the nbd workload with a writing client on
/// that node.
fn writer_of(row: &crate::exports::ExportRow) -> Option<u64> {
    if !row
        .name
        .starts_with(super::workload::nbd::EXPORT_DIR_PREFIX)
    {
        return None;
    }
    let owner = row.owner_node?;
    row.clients
        .iter()
        .any(|c| c.owner && c.node == owner)
        .then_some(owner)
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
    ) -> BoxFuture<'a, Result<String, NemesisError>> {
        Box::pin(async { Ok(String::new()) })
    }

    fn heal_all<'a>(
        &'a mut self,
        _cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<(), NemesisError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A node's redirector as its diagnostic service reports it: its mode and counters.
async fn redirector_stats(
    client: &CtlClient,
    node: u64,
) -> Result<(String, redirector::RedirectStats), String> {
    match crate::redirect::diag(client, node, &DiagRequest::Stats, Duration::from_secs(2)).await {
        Ok(DiagReply::Stats { mode, stats, .. }) => Ok((mode, stats)),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// SAN path faults on node K's nbdkit (clusters started with `--san nbdkit`), through
/// [`crate::fault`]:
/// - `san-down`: SIGKILL the nbdkit (a pulled cable: requests fail at once);
/// - `san-hang`: pause it (requests hang until it resumes, then execute: late writes);
/// - `san-flaky`: restart it failing 1%, 5% or 20% of requests with EIO (seeded by the
///   fault's start time, like [`MigrateNemesis`]'s choice of export).
///
/// Heal is `san-up` (resume, and restart with the normal profile if it is dead or faulty).
/// The report shows what the node's redirector did meanwhile: the requests it sent through
/// peers, its timeouts and re-issues, and its mode just before the heal.
#[derive(Debug, Default)]
pub struct SanNemesis {
    /// The redirector counters of each faulted node just before its fault.
    before: BTreeMap<u64, redirector::RedirectStats>,
}

impl SanNemesis {
    /// Runs a [`crate::fault`] injection off the runtime (it waits for processes and
    /// sockets), then reloads the cluster file it rewrote.
    async fn apply(
        cluster: &mut ClusterControl,
        node: u64,
        fault: Fault,
        what: &str,
    ) -> Result<(), NemesisError> {
        let (dir, csvd) = (cluster.dir.clone(), cluster.csvd.clone());
        let done = tokio::task::spawn_blocking(move || {
            // nbdkit daemonizes: the SAN processes are not children of this process.
            let mut none = Children::default();
            crate::fault::inject(&dir, node, fault, &mut none, &csvd)
        })
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the injection task failed: {e}")));
        // Reload even after a failure: a half-done injection may have saved new pids.
        if let Ok(f) = ClusterFile::load(&cluster.dir) {
            cluster.file = f;
        }
        done.map_err(|e| NemesisError::Inject {
            what: what.into(),
            node,
            source: e.into(),
        })
    }

    /// The error rate of a `san-flaky` fault, in percent.
    pub fn flaky_rate_pct(fault: &PlannedFault) -> f64 {
        const RATES: [f64; 3] = [1.0, 5.0, 20.0];
        RATES[SplitMix64::new(fault.at_s.to_bits() ^ 0x53_414E).below(3) as usize]
    }
}

impl Nemesis for SanNemesis {
    fn kinds(&self) -> &'static [FaultKind] {
        &[FaultKind::SanDown, FaultKind::SanHang, FaultKind::SanFlaky]
    }

    fn inject<'a>(
        &'a mut self,
        fault: &'a PlannedFault,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<ActiveFault, NemesisError>> {
        Box::pin(async move {
            let kind = fault.kind;
            let Some(node) = fault.node else {
                return Err(NemesisError::Unsupported {
                    kind,
                    why: "no node to hit".into(),
                });
            };
            if cluster.file.san_mode != SanMode::Nbdkit {
                return Err(NemesisError::Unsupported {
                    kind,
                    why: "the cluster's nodes open the LUN file directly (no --san nbdkit)".into(),
                });
            }
            if let Ok((_, s)) = redirector_stats(&cluster.client()?, node).await {
                self.before.insert(node, s);
            }
            let (f, action, note) = match kind {
                FaultKind::SanDown => (Fault::SanDown, "kill nbdkit", String::new()),
                FaultKind::SanHang => (Fault::SanHang, "pause nbdkit", String::new()),
                FaultKind::SanFlaky => {
                    let rate_pct = Self::flaky_rate_pct(fault);
                    (
                        Fault::SanFlaky { rate_pct },
                        "nbdkit errors",
                        format!("EIO on {rate_pct}% of requests"),
                    )
                }
                _ => {
                    return Err(NemesisError::Unsupported {
                        kind,
                        why: "not a SAN path fault".into(),
                    });
                }
            };
            Self::apply(cluster, node, f, kind.name()).await?;
            Ok(ActiveFault {
                kind,
                node: Some(node),
                action,
                note,
                stall_s: None,
            })
        })
    }

    fn heal<'a>(
        &'a mut self,
        fault: &'a ActiveFault,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<String, NemesisError>> {
        Box::pin(async move {
            let Some(node) = fault.node else {
                return Ok(String::new());
            };
            let seen = match redirector_stats(&cluster.client()?, node).await {
                Ok((mode, now)) => match self.before.remove(&node) {
                    Some(b) => format!(
                        "redirector: {} requests via peers, {} timed out, {} re-issued; {mode} at heal",
                        now.peer_attempts.saturating_sub(b.peer_attempts),
                        now.timeouts.saturating_sub(b.timeouts),
                        now.reissues.saturating_sub(b.reissues),
                    ),
                    None => format!("redirector: {mode} at heal"),
                },
                Err(e) => format!("redirector stats unavailable at heal: {e}"),
            };
            Self::apply(cluster, node, Fault::SanUp, "restore the SAN path").await?;
            Ok(seen)
        })
    }

    fn heal_all<'a>(
        &'a mut self,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<(), NemesisError>> {
        Box::pin(async move {
            self.before.clear();
            if cluster.file.san_mode != SanMode::Nbdkit {
                return Ok(());
            }
            let mut first_err = None;
            for node in cluster.node_ids() {
                if let Err(e) =
                    Self::apply(cluster, node, Fault::SanUp, "restore the SAN path").await
                {
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        })
    }
}

/// Which nodes a `partition` cuts off from the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionShape {
    /// The planned node alone.
    Node,
    /// The leader of that moment alone: the majority must elect another.
    Leader,
    /// A minority group, `(n - 1) / 2` nodes from the planned one on (in id order,
    /// wrapping), still connected among themselves (clusters of 5 nodes or more).
    Group,
}

impl PartitionShape {
    /// The shape of a `partition` fault on `n` nodes (seeded by the fault's start time).
    pub fn of(fault: &PlannedFault, n: usize) -> PartitionShape {
        let shapes: &[PartitionShape] = if n >= 5 {
            &[
                PartitionShape::Node,
                PartitionShape::Leader,
                PartitionShape::Group,
            ]
        } else {
            &[PartitionShape::Node, PartitionShape::Leader]
        };
        let pick = SplitMix64::new(fault.at_s.to_bits() ^ 0x5041_5254).below(shapes.len() as u64);
        shapes[pick as usize]
    }

    /// The minority side: `first` (the planned node or the leader) and, for a group, the
    /// nodes after it. Never more than `(n - 1) / 2` nodes for `n >= 3`.
    pub fn minority(self, first: u64, nodes: &[u64]) -> Vec<u64> {
        let size = match self {
            PartitionShape::Group => ((nodes.len() - 1) / 2).max(1),
            PartitionShape::Node | PartitionShape::Leader => 1,
        };
        let start = nodes.iter().position(|&x| x == first).unwrap_or(0);
        let mut out: Vec<u64> = (0..size)
            .map(|i| nodes[(start + i) % nodes.len()])
            .collect();
        out.sort_unstable();
        out
    }
}

/// LAN partitions (clusters started with `--netns`): the minority side chosen by
/// [`PartitionShape`] is cut off from the majority with [`crate::netns::partition`]
/// (packets silently dropped both ways; the host and its clients still reach every node,
/// as VMs on an isolated host still reach it). Heal removes the cut. The report shows the
/// leader and term each node saw before the cut and just before the heal.
#[derive(Debug, Default)]
pub struct PartitionNemesis;

impl PartitionNemesis {
    /// Who follows which leader, e.g. `1,2: leader 1 term 3; 3: leader 3 term 4`.
    async fn leader_view(cluster: &ClusterControl) -> String {
        let Ok(client) = cluster.client() else {
            return "no client".into();
        };
        let mut groups: BTreeMap<Option<(Option<u64>, u64)>, Vec<u64>> = BTreeMap::new();
        for (n, s) in client.statuses(Duration::from_secs(1)).await {
            groups
                .entry(s.map(|s| (s.leader, s.term)))
                .or_default()
                .push(n);
        }
        groups
            .into_iter()
            .map(|(view, ns)| {
                let ns: Vec<String> = ns.iter().map(u64::to_string).collect();
                let ns = ns.join(",");
                match view {
                    Some((Some(l), t)) => format!("{ns}: leader {l} term {t}"),
                    Some((None, t)) => format!("{ns}: no leader, term {t}"),
                    None => format!("{ns}: no answer"),
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn lan(
        f: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
    ) -> Result<(), NemesisError> {
        tokio::task::spawn_blocking(f)
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the LAN task failed: {e}")))
            .map_err(|e| NemesisError::Lan(e.into()))
    }
}

impl Nemesis for PartitionNemesis {
    fn kinds(&self) -> &'static [FaultKind] {
        &[FaultKind::Partition]
    }

    fn inject<'a>(
        &'a mut self,
        fault: &'a PlannedFault,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<ActiveFault, NemesisError>> {
        Box::pin(async move {
            let kind = fault.kind;
            let unsupported = |why: &str| NemesisError::Unsupported {
                kind,
                why: why.into(),
            };
            let Some(netns) = cluster.file.netns.clone() else {
                return Err(unsupported(
                    "the cluster has no network namespaces (start it with --netns)",
                ));
            };
            let nodes = cluster.node_ids();
            if nodes.len() < 2 {
                return Err(unsupported("a single node has no peer to be cut off from"));
            }
            let planned = fault.node.ok_or_else(|| unsupported("no node planned"))?;
            let shape = PartitionShape::of(fault, nodes.len());
            let first = match shape {
                PartitionShape::Leader => cluster.leader(Duration::from_secs(5)).await?,
                PartitionShape::Node | PartitionShape::Group => planned,
            };
            let minority = shape.minority(first, &nodes);
            let majority: Vec<u64> = nodes
                .iter()
                .copied()
                .filter(|n| !minority.contains(n))
                .collect();
            let before = Self::leader_view(cluster).await;
            let note = format!(
                "cut {}{minority:?} off from {majority:?} (before: {before})",
                match shape {
                    PartitionShape::Node => "node ",
                    PartitionShape::Leader => "the leader ",
                    PartitionShape::Group => "group ",
                }
            );
            let (a, b) = (minority.clone(), majority);
            Self::lan(move || crate::netns::partition(&netns, &a, &b)).await?;
            Ok(ActiveFault {
                kind,
                node: Some(first),
                action: "partition",
                note,
                stall_s: None,
            })
        })
    }

    fn heal<'a>(
        &'a mut self,
        _fault: &'a ActiveFault,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<String, NemesisError>> {
        Box::pin(async move {
            let Some(netns) = cluster.file.netns.clone() else {
                return Ok(String::new());
            };
            let seen = format!("at heal: {}", Self::leader_view(cluster).await);
            let nodes = cluster.node_ids();
            Self::lan(move || crate::netns::unpartition(&netns, &nodes)).await?;
            Ok(seen)
        })
    }

    fn heal_all<'a>(
        &'a mut self,
        cluster: &'a mut ClusterControl,
    ) -> BoxFuture<'a, Result<(), NemesisError>> {
        Box::pin(async move {
            match cluster.file.netns.clone() {
                Some(netns) => Self::lan(move || crate::netns::heal_all(&netns)).await,
                None => Ok(()),
            }
        })
    }
}

/// What the cluster must offer for a set of fault kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterNeeds {
    /// An nbdkit SAN path per node (`cluster up --san nbdkit`), for `san-*`.
    pub san_nbdkit: bool,
    /// A network namespace per node (`cluster up --netns`), for `partition`.
    pub netns: bool,
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

impl ClusterNeeds {
    pub fn of(kinds: &[FaultKind]) -> ClusterNeeds {
        ClusterNeeds {
            san_nbdkit: kinds.iter().any(|k| {
                matches!(
                    k,
                    FaultKind::SanDown | FaultKind::SanHang | FaultKind::SanFlaky
                )
            }),
            netns: kinds.contains(&FaultKind::Partition),
        }
    }

    fn san_kinds(kinds: &[FaultKind]) -> String {
        let v: Vec<&str> = kinds
            .iter()
            .filter(|k| Self::of(&[**k]).san_nbdkit)
            .map(|k| k.name())
            .collect();
        v.join(",")
    }

    /// Why the running cluster in `dir` cannot take these faults, if it cannot.
    pub fn check_cluster(
        &self,
        kinds: &[FaultKind],
        dir: &Path,
        file: &ClusterFile,
    ) -> Result<(), String> {
        let d = dir.display();
        if self.san_nbdkit && file.san_mode != SanMode::Nbdkit {
            return Err(format!(
                "the {} faults break a node's nbdkit SAN path, but the cluster in {d} opens the LUN file directly; \
                 start one with `csvctl cluster up --san nbdkit` (or leave out --cluster and chaos starts one)",
                Self::san_kinds(kinds)
            ));
        }
        if self.netns && file.netns.is_none() {
            return Err(format!(
                "the partition fault cuts links between network namespaces, but the cluster in {d} runs without them; \
                 start one with `csvctl cluster up --netns` (or leave out --cluster and chaos starts one)"
            ));
        }
        Ok(())
    }

    /// Why this host cannot start a cluster with what these faults need, if it cannot.
    pub fn check_host(&self, kinds: &[FaultKind]) -> Result<(), String> {
        if self.san_nbdkit && !on_path("nbdkit") {
            return Err(format!(
                "the {} faults need nbdkit for the nodes' SAN paths, and it is not installed (scripts/install-deps.sh)",
                Self::san_kinds(kinds)
            ));
        }
        if self.netns {
            // SAFETY: geteuid(2) has no preconditions and cannot fail.
            let root = unsafe { libc::geteuid() } == 0;
            if !root {
                return Err(
                    "the partition fault puts every node in its own network namespace, which needs root (CAP_NET_ADMIN)"
                        .into(),
                );
            }
            for tool in ["ip", "nsenter"] {
                if !on_path(tool) {
                    return Err(format!(
                        "the partition fault needs `{tool}` for the nodes' network namespaces, and it is not installed"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The nemeses of this build: the dispatch point for fault modules (each kind is
/// handled by exactly one).
fn all() -> Vec<Box<dyn Nemesis>> {
    vec![
        Box::new(ProcessNemesis),
        Box::new(MigrateNemesis),
        Box::new(SanNemesis::default()),
        Box::new(PartitionNemesis),
    ]
}

/// The nemeses needed for `kinds`, or the first kind this build cannot inject.
pub fn registry(kinds: &[FaultKind]) -> Result<Vec<Box<dyn Nemesis>>, NemesisError> {
    let mut pool = all();
    for k in kinds {
        if !pool.iter().any(|n| n.kinds().contains(k)) {
            return Err(NemesisError::Unavailable { kind: *k });
        }
    }
    pool.retain(|n| n.kinds().iter().any(|k| kinds.contains(k)));
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_kind_has_exactly_one_nemesis() {
        let pool = registry(&FaultKind::ALL).unwrap();
        assert_eq!(pool.len(), 4);
        for k in FaultKind::ALL {
            let n = all().iter().filter(|n| n.kinds().contains(&k)).count();
            assert_eq!(n, 1, "{k}");
        }
        let ok = registry(&[FaultKind::Kill, FaultKind::Pause, FaultKind::Leader]).unwrap();
        assert_eq!(ok.len(), 1);
        let ok = registry(&[
            FaultKind::SanDown,
            FaultKind::SanFlaky,
            FaultKind::Partition,
        ])
        .unwrap();
        assert_eq!(ok.len(), 2);
    }

    #[test]
    fn san_and_partition_kinds_say_what_the_cluster_needs() {
        assert_eq!(
            ClusterNeeds::of(&[FaultKind::Kill, FaultKind::Migrate]),
            ClusterNeeds::default()
        );
        let n = ClusterNeeds::of(&[FaultKind::SanHang, FaultKind::Partition]);
        assert!(n.san_nbdkit && n.netns);
        assert_eq!(
            ClusterNeeds::san_kinds(&[FaultKind::Kill, FaultKind::SanDown, FaultKind::SanFlaky]),
            "san-down,san-flaky"
        );
    }

    fn planned(at_s: f64, node: u64) -> PlannedFault {
        PlannedFault {
            at_s,
            kind: FaultKind::Partition,
            node: Some(node),
            duration_s: 1.0,
            leader_action: None,
        }
    }

    #[test]
    fn partitions_cut_off_a_minority_holding_the_chosen_node() {
        for n in 2..=16usize {
            let nodes: Vec<u64> = (1..=n as u64).collect();
            let mut shapes = std::collections::BTreeSet::new();
            for i in 0..200 {
                let f = planned(2.0 + i as f64 * 0.37, nodes[i % n]);
                let shape = PartitionShape::of(&f, n);
                shapes.insert(format!("{shape:?}"));
                let first = f.node.unwrap();
                let m = shape.minority(first, &nodes);
                assert!(m.contains(&first), "{m:?}");
                assert!(m.iter().all(|x| nodes.contains(x)));
                assert!(!m.is_empty() && m.len() < n, "{n} nodes: {m:?}");
                if n >= 3 {
                    assert!(m.len() <= (n - 1) / 2, "{n} nodes: {m:?} is no minority");
                }
                if shape == PartitionShape::Group {
                    assert!(n >= 5 && m.len() >= 2, "{n}: {m:?}");
                }
            }
            assert_eq!(shapes.len(), if n >= 5 { 3 } else { 2 }, "{n}: {shapes:?}");
        }
        // Wrapping: a group of 2 out of 5 starting at the last node.
        assert_eq!(
            PartitionShape::Group.minority(5, &[1, 2, 3, 4, 5]),
            vec![1, 5]
        );
    }

    #[test]
    fn flaky_rates_are_seeded_by_the_fault_and_all_used() {
        let rates: std::collections::BTreeSet<u64> = (0..100)
            .map(|i| SanNemesis::flaky_rate_pct(&planned(2.0 + i as f64 * 0.5, 1)) as u64)
            .collect();
        assert_eq!(rates.into_iter().collect::<Vec<_>>(), vec![1, 5, 20]);
        let f = planned(7.25, 2);
        assert_eq!(
            SanNemesis::flaky_rate_pct(&f),
            SanNemesis::flaky_rate_pct(&f)
        );
    }
}
