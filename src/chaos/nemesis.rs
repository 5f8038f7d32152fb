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

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::schedule::{FaultKind, LeaderAction, PlannedFault};
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

    /// SIGKILL a node and wait until the process is gone.
    pub async fn kill(&mut self, node: u64) -> Result<(), NemesisError> {
        let pid = self.pid(node)?;
        cluster::signal(pid, libc::SIGCONT);
        cluster::signal(pid, libc::SIGKILL);
        let timeout = Duration::from_secs(10);
        let deadline = Instant::now() + timeout;
        loop {
            self.children.reap();
            if !cluster::pid_alive(pid) {
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

/// A fault in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveFault {
    pub kind: FaultKind,
    pub node: Option<u64>,
    /// What was done, for the report ("kill -9", "SIGSTOP").
    pub action: &'static str,
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

/// What a fault kind that no nemesis of this build handles is waiting for.
fn needs(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::Partition => {
            "node isolation needs the fault module of the redirector I/O loop (`csvctl fault isolate/heal`)"
        }
        FaultKind::SanDown | FaultKind::SanHang | FaultKind::SanFlaky => {
            "SAN path faults need the redirector I/O loop and its fault module (`csvctl fault san-down/san-hang/san-flaky`)"
        }
        FaultKind::Migrate => "live migration needs NBD exports over the volume",
        FaultKind::Kill | FaultKind::Pause | FaultKind::Leader => "no nemesis registered",
    }
}

/// The nemeses of this build.
fn all() -> Vec<Box<dyn Nemesis>> {
    vec![Box::new(ProcessNemesis)]
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
    fn process_faults_are_available_and_the_rest_are_refused_with_a_reason() {
        let ok = registry(&[FaultKind::Kill, FaultKind::Pause, FaultKind::Leader]).unwrap();
        assert_eq!(ok.len(), 1);
        for k in [
            FaultKind::Partition,
            FaultKind::SanDown,
            FaultKind::SanHang,
            FaultKind::SanFlaky,
            FaultKind::Migrate,
        ] {
            let e = registry(&[FaultKind::Kill, k]).err().unwrap().to_string();
            assert!(e.contains(k.name()) && e.contains("not available"), "{e}");
        }
    }
}
