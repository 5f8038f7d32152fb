//! The chaos harness: runs workloads against a real cluster while a seeded schedule of
//! faults hits it, heals everything, waits for convergence, gathers the final state, and
//! checks the whole history (`csvctl chaos`, and the integration tests through [`run`]).
//!
//! - [`schedule`]: fault kinds and the deterministic schedule from a seed;
//! - [`nemesis`]: what injects and heals each fault kind;
//! - [`workload`]: the clients, recording every operation;
//! - [`block`]: the self-describing block the nbd and fuse workloads write;
//! - [`history`]: the recorded run (JSON lines), re-checkable offline;
//! - [`checker`]: pure verdicts over a history;
//! - [`report`]: counts, faults with their stalls, verdicts.
//!
//! Invariants of a run: nothing starts before every requested fault kind and workload
//! is known to be available, and the cluster (started or given) is known to offer what
//! those kinds need; a fault is injected only once every node has recovered from the
//! previous one (or a bounded wait, [`READY_BOUND`], has run out: the fault's detail
//! says so); every injected fault is healed before the final state is gathered; the
//! verdict is computed from the history file's content alone.

pub mod block;
pub mod checker;
pub mod history;
pub mod nemesis;
pub mod report;
pub mod schedule;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use csv_core::meta::PathState;
use lockmgr::rpc::message::{Query, QueryReply, Reply, Request};
use tokio_util::sync::CancellationToken;

use self::history::{
    FaultRecord, FinalState, HistoryError, NodeDigest, NodePath, Recorder, RunHeader,
};
use self::nemesis::{ClusterControl, ClusterNeeds, Nemesis, NemesisError};
use self::report::Report;
use self::schedule::{FaultKind, ScheduleShape};
use self::workload::{Workload, WorkloadEnv, WorkloadError, WorkloadKind};
use crate::client::CtlClient;
use crate::cluster::{self, Children, ClusterFile, SanMode, UpOptions};
use crate::config::RedirectorSection;

/// The longest a fault waits for every node to be ready after the previous fault.
pub const READY_BOUND: Duration = Duration::from_secs(20);

/// How to run one chaos test.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub nodes: usize,
    pub duration: Duration,
    pub seed: u64,
    pub faults: Vec<FaultKind>,
    pub workloads: Vec<WorkloadKind>,
    /// Keep the cluster (and the history) in this directory.
    pub keep: Option<PathBuf>,
    /// Use this running cluster instead of starting one.
    pub cluster: Option<PathBuf>,
    /// Where to write the history (default: see [`ChaosOptions::history_path`]).
    pub history: Option<PathBuf>,
    /// The csvd binary (to start the cluster and restart killed nodes).
    pub csvd: PathBuf,
    /// Session TTL of a cluster the harness starts (short, so pauses outlive sessions).
    pub session_ttl_ms: u64,
    /// Redirector settings of a cluster the harness starts (see [`chaos_redirector`]).
    pub redirector: RedirectorSection,
    pub shape: ScheduleShape,
    /// How long to wait for the cluster to be ready again after healing.
    pub converge_timeout: Duration,
    /// Ends the fault phase early (e.g. on Ctrl-C); healing, convergence and the checks
    /// still run, over the shortened history.
    pub interrupt: CancellationToken,
}

impl ChaosOptions {
    pub fn new(nodes: usize, duration: Duration, seed: u64) -> Self {
        ChaosOptions {
            nodes,
            duration,
            seed,
            faults: vec![FaultKind::Kill, FaultKind::Pause, FaultKind::Leader],
            workloads: vec![WorkloadKind::Meta],
            keep: None,
            cluster: None,
            history: None,
            csvd: cluster::default_csvd_binary(),
            session_ttl_ms: 4_000,
            redirector: chaos_redirector(),
            shape: ScheduleShape::default(),
            converge_timeout: Duration::from_secs(60),
            interrupt: CancellationToken::new(),
        }
    }

    /// `--history`, else `KEEP/history.jsonl`, else `CLUSTER/chaos-SEED.jsonl`, else
    /// `./chaos-SEED.jsonl`.
    pub fn history_path(&self) -> PathBuf {
        let name = format!("chaos-{}.jsonl", self.seed);
        match (&self.history, &self.keep, &self.cluster) {
            (Some(h), _, _) => h.clone(),
            (None, Some(k), _) => k.join("history.jsonl"),
            (None, None, Some(c)) => c.join(name),
            (None, None, None) => PathBuf::from(name),
        }
    }
}

/// The redirector of a cluster the harness starts: the defaults, but failing back to the
/// SAN path after 2 s of healthy probes (probed every 200 ms) instead of 10 s, and flap
/// damping bounded at 8 s instead of 5 minutes. Faults come every few seconds, so with the
/// defaults a node hit twice would stay redirected for minutes and every later fault would
/// wait [`READY_BOUND`] for it; the damping itself is still exercised.
pub fn chaos_redirector() -> RedirectorSection {
    RedirectorSection {
        probe_interval_ms: 200,
        failback_healthy_ms: 2_000,
        failback_max_ms: 8_000,
        flap_window_ms: 5_000,
        ..RedirectorSection::default()
    }
}

/// What the harness failed to do (a run that finishes with violations is not an error:
/// it is an invalid [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error("refused: {0}")]
    Options(String),
    #[error("cannot inject the faults asked for")]
    Faults(#[source] NemesisError),
    #[error("cannot run the workloads asked for")]
    Workload(#[source] WorkloadError),
    #[error("cannot start or reach the cluster in {dir}")]
    Cluster {
        dir: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot record the history")]
    History(#[source] HistoryError),
}

/// Runs a chaos test and returns its report (`report.valid` is the verdict).
pub async fn run(opts: &ChaosOptions) -> Result<Report, ChaosError> {
    if !(1..=16).contains(&opts.nodes) && opts.cluster.is_none() {
        return Err(ChaosError::Options(format!(
            "--nodes must be between 1 and 16 (got {})",
            opts.nodes
        )));
    }
    if opts.duration.as_secs_f64() < opts.shape.warmup_s + opts.shape.tail_s {
        return Err(ChaosError::Options(format!(
            "--duration must be at least {:.0}s",
            opts.shape.warmup_s + opts.shape.tail_s
        )));
    }
    // Refuse what this build cannot do before anything starts.
    if opts.faults.contains(&FaultKind::Migrate) && !opts.workloads.contains(&WorkloadKind::Nbd) {
        return Err(ChaosError::Options(
            "the migrate fault moves the nbd workload's exports: add nbd to --workload".into(),
        ));
    }
    let mut nemeses = nemesis::registry(&opts.faults).map_err(ChaosError::Faults)?;
    let needs = ClusterNeeds::of(&opts.faults);
    match &opts.cluster {
        Some(dir) => {
            let file = ClusterFile::load(dir).map_err(|e| ChaosError::Cluster {
                dir: dir.clone(),
                source: e.into(),
            })?;
            needs
                .check_cluster(&opts.faults, dir, &file)
                .map_err(ChaosError::Options)?;
        }
        None => needs
            .check_host(&opts.faults)
            .map_err(ChaosError::Options)?,
    }
    let workloads = opts
        .workloads
        .iter()
        .map(|k| workload::build(*k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ChaosError::Workload)?;

    let (dir, owned, temp) = match (&opts.cluster, &opts.keep) {
        (Some(c), _) => (c.clone(), false, false),
        (None, Some(k)) => (k.clone(), true, false),
        (None, None) => (
            std::env::temp_dir().join(format!(
                "csvd-chaos-{}-{}-{:08x}",
                opts.seed,
                std::process::id(),
                rand::random::<u32>()
            )),
            true,
            true,
        ),
    };
    let cluster_err = |e: anyhow::Error| ChaosError::Cluster {
        dir: dir.clone(),
        source: e.into(),
    };
    let mut children = Children::default();
    let file = if owned {
        let mut up = UpOptions::new(dir.clone(), opts.nodes);
        up.csvd = opts.csvd.clone();
        up.lun_size = 256 << 20;
        up.session.ttl_ms = opts.session_ttl_ms;
        up.redirector = opts.redirector.clone();
        if needs.san_nbdkit {
            up.san = SanMode::Nbdkit;
        }
        up.netns = needs.netns;
        match cluster::up(&up, &mut children).await {
            Ok(f) => f,
            Err(e) => {
                if ClusterFile::path(&dir).exists() {
                    let _ = cluster::down(&dir, &mut children).await;
                }
                return Err(cluster_err(e));
            }
        }
    } else {
        ClusterFile::load(&dir).map_err(cluster_err)?
    };
    let dir = file
        .lun
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(dir.clone());
    let mut ctl = ClusterControl {
        dir: dir.clone(),
        file,
        children,
        csvd: opts.csvd.clone(),
    };

    // Nodes restarted while the workloads hold files open on the mounts are started by a
    // spawner that holds none (see `crate::spawner`); without one (no `csvctl` beside
    // `csvd`) they are started directly, and a start may wait for every node's FLUSH.
    let csvctl = opts.csvd.with_file_name("csvctl");
    match crate::spawner::Spawner::start(&csvctl) {
        Ok(s) => {
            cluster::use_spawner(Some(s));
        }
        Err(e) => tracing::warn!(
            csvctl = %csvctl.display(),
            error = %e,
            "no spawner; nodes are restarted directly by the harness"
        ),
    }
    let result = run_on(opts, &mut ctl, &mut nemeses, workloads).await;
    cluster::use_spawner(None);

    if owned {
        if let Err(e) = cluster::down(&dir, &mut ctl.children).await {
            tracing::warn!(error = %e, "stopping the chaos cluster");
        }
        let keep_failed = result.as_ref().map(|r| !r.valid).unwrap_or(true);
        if temp && !keep_failed {
            let _ = std::fs::remove_dir_all(&dir);
        } else if temp {
            eprintln!(
                "csvctl chaos: the cluster of the failed run is kept in {}",
                dir.display()
            );
        }
    } else {
        // Nodes we restarted belong to the user's cluster: leave them running.
        std::mem::forget(std::mem::take(&mut ctl.children));
    }
    result
}

async fn run_on(
    opts: &ChaosOptions,
    ctl: &mut ClusterControl,
    nemeses: &mut [Box<dyn Nemesis>],
    mut workloads: Vec<Box<dyn Workload>>,
) -> Result<Report, ChaosError> {
    let node_ids = ctl.node_ids();
    let run_s = opts.duration.as_secs_f64();
    let plan = schedule::plan(opts.seed, &node_ids, run_s, &opts.faults, opts.shape);
    let header = RunHeader {
        seed: opts.seed,
        nodes: node_ids.len(),
        duration_s: run_s,
        faults: opts.faults.iter().map(|k| k.name().to_string()).collect(),
        workloads: opts
            .workloads
            .iter()
            .map(|k| k.name().to_string())
            .collect(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let history_path = opts.history_path();
    let rec = Arc::new(Recorder::create(&history_path, &header).map_err(ChaosError::History)?);
    let key = ctl.file.key().map_err(|e| ChaosError::Cluster {
        dir: ctl.dir.clone(),
        source: e.into(),
    })?;
    let client = ctl.file.client().map_err(|e| ChaosError::Cluster {
        dir: ctl.dir.clone(),
        source: e.into(),
    })?;
    let env = Arc::new(WorkloadEnv {
        nodes: ctl
            .file
            .nodes
            .iter()
            .map(|n| (n.id, n.rpc.clone()))
            .collect(),
        nbd: ctl
            .file
            .nodes
            .iter()
            .map(|n| (n.id, n.nbd.clone()))
            .collect(),
        mounts: ctl
            .file
            .nodes
            .iter()
            .map(|n| (n.id, n.mount.clone()))
            .collect(),
        client,
        key,
        recorder: rec.clone(),
        seed: opts.seed,
    });
    for w in workloads.iter_mut() {
        w.setup(&env).await.map_err(ChaosError::Workload)?;
    }
    let workloads: Vec<Arc<dyn Workload>> = workloads.into_iter().map(Arc::from).collect();

    // Run the workloads and the schedule.
    let stop = CancellationToken::new();
    let base = Instant::now();
    rec.start_clock();
    let running: Vec<_> = workloads
        .iter()
        .map(|w| tokio::spawn(w.clone().run(env.clone(), stop.clone())))
        .collect();
    let interrupt = &opts.interrupt;
    // Sleeps until `at`; false if the run was interrupted.
    let wait = |at: Instant| async move {
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => true,
            _ = interrupt.cancelled() => false,
        }
    };
    // Faults keep their planned start unless the cluster is still recovering then: the
    // gap before a fault is its recovery time, and a longer recovery delays only that
    // fault (a later one may then follow it without a gap, once the cluster is ready).
    let last_end = base + Duration::from_secs_f64((run_s - opts.shape.tail_s).max(0.0));
    for f in &plan {
        if !wait(base + Duration::from_secs_f64(f.at_s)).await {
            break;
        }
        let Some(nem) = nemeses.iter_mut().find(|n| n.kinds().contains(&f.kind)) else {
            continue;
        };
        let waited = tokio::select! {
            w = wait_until_ready(&ctl.file, READY_BOUND) => w,
            _ = interrupt.cancelled() => break,
        };
        let ready_note = waited.note();
        if Instant::now() + Duration::from_secs_f64(f.duration_s) > last_end {
            tracing::info!(
                kind = %f.kind,
                "waiting for recovery pushed this fault past the run's end: skipped"
            );
            continue;
        }
        let start_s = rec.now();
        let (node, mut detail, stall_s) = match nem.inject(f, ctl).await {
            // An instantaneous fault (a migration): done when inject returns.
            Ok(active) if active.stall_s.is_some() => {
                (active.node, active.note.clone(), active.stall_s)
            }
            Ok(active) => {
                wait(Instant::now() + Duration::from_secs_f64(f.duration_s)).await;
                let healed = nem.heal(&active, ctl).await;
                let mut detail = format!("{} for {:.1}s", active.action, f.duration_s);
                for note in [&active.note, healed.as_ref().unwrap_or(&String::new())] {
                    if !note.is_empty() {
                        detail.push_str("; ");
                        detail.push_str(note);
                    }
                }
                if let Err(e) = healed {
                    detail.push_str(&format!("; heal failed: {e}"));
                }
                (active.node, detail, None)
            }
            Err(e) => (f.node, format!("not injected: {e}"), None),
        };
        if let Some(n) = ready_note {
            detail.push_str("; ");
            detail.push_str(&n);
        }
        rec.fault(FaultRecord {
            kind: f.kind.name().into(),
            node,
            start_s,
            end_s: rec.now(),
            detail,
            stall_s,
        });
    }
    if !wait(base + opts.duration).await {
        tracing::warn!(
            after_s = rec.now(),
            "interrupted: healing and checking the run so far"
        );
    }
    stop.cancel();
    let mut failure = None;
    for r in running {
        match r.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(ChaosError::Workload(e)),
            Err(_) => {
                failure = Some(ChaosError::Workload(WorkloadError::Panicked {
                    workload: "?",
                }))
            }
        }
    }

    // Heal everything, wait for convergence, read back, gather the final state.
    for n in nemeses.iter_mut() {
        if let Err(e) = n.heal_all(ctl).await {
            tracing::warn!(error = %e, "healing");
        }
    }
    let healed = Instant::now();
    let converge_s = match cluster::wait_ready(&ctl.file, opts.converge_timeout).await {
        Ok(()) => {
            // Ready also means back on the SAN path (the redirector fails back on its own).
            let left = opts.converge_timeout.saturating_sub(healed.elapsed());
            match wait_until_ready(&ctl.file, left).await.missing {
                None => Some(healed.elapsed().as_secs_f64()),
                Some(m) => {
                    tracing::warn!(missing = %m, "the cluster did not converge");
                    None
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "the cluster did not converge");
            None
        }
    };
    for w in &workloads {
        if let Err(e) = w.verify(&env).await {
            failure = Some(ChaosError::Workload(e));
        }
    }
    let client = ctl.file.client().map_err(|e| ChaosError::Cluster {
        dir: ctl.dir.clone(),
        source: e.into(),
    })?;
    let final_state = FinalState {
        converge_s,
        fsck: crate::fsck::live(&client, &node_ids).await,
        digests: digests(&client, &node_ids, Duration::from_secs(30)).await,
        paths: paths(&client).await,
        nodes: node_ids,
    };
    rec.final_state(final_state);
    rec.flush().map_err(ChaosError::History)?;
    if let Some(e) = failure {
        return Err(e);
    }
    let h = rec.snapshot(&header);
    Ok(Report::from_history(
        &h,
        &history_path.display().to_string(),
    ))
}

/// How a wait for the cluster to be ready ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyWait {
    pub waited: Duration,
    /// What was still missing when the wait gave up (`None`: ready).
    pub missing: Option<String>,
}

impl ReadyWait {
    /// For a fault's detail: nothing if the cluster was ready at once.
    pub fn note(&self) -> Option<String> {
        let s = self.waited.as_secs_f64();
        match &self.missing {
            None if s < 0.05 => None,
            None => Some(format!("waited {s:.1}s for every node to be ready first")),
            Some(m) => Some(format!(
                "injected with the cluster not ready after {s:.1}s: {m}"
            )),
        }
    }
}

/// Polls until [`not_ready`] finds nothing missing, for at most `bound`.
pub async fn wait_until_ready(file: &ClusterFile, bound: Duration) -> ReadyWait {
    let t0 = Instant::now();
    let client = match file.client() {
        Ok(c) => c,
        Err(e) => {
            return ReadyWait {
                waited: Duration::ZERO,
                missing: Some(format!("no client: {e:#}")),
            };
        }
    };
    loop {
        let missing = not_ready(file, &client).await;
        if missing.is_none() || t0.elapsed() >= bound {
            return ReadyWait {
                waited: t0.elapsed(),
                missing,
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What keeps the cluster from being ready for a fault (`None`: ready): every node is
/// running and answers, holds a live metadata session, has its FUSE mount, and its
/// published SAN path state is `direct`.
pub async fn not_ready(file: &ClusterFile, client: &CtlClient) -> Option<String> {
    let statuses = client.statuses(Duration::from_secs(1)).await;
    let mut missing = Vec::new();
    for e in &file.nodes {
        if !cluster::pid_alive(e.pid) {
            missing.push(format!("node {} is down", e.id));
            continue;
        }
        match statuses
            .iter()
            .find(|(n, _)| *n == e.id)
            .and_then(|(_, s)| s.as_ref())
        {
            None => missing.push(format!("node {} does not answer", e.id)),
            Some(s) if s.session.is_none() => missing.push(format!("node {} has no session", e.id)),
            Some(_) => {}
        }
        if !cluster::is_mounted(&e.mount) {
            missing.push(format!("node {} is not mounted", e.id));
        }
    }
    if missing.is_empty() {
        match client.query(Query::Nodes).await {
            Ok(QueryReply::Nodes(records)) => {
                for e in &file.nodes {
                    match records.iter().find(|r| r.id == e.id) {
                        Some(r) if r.path.state == PathState::Direct => {}
                        Some(r) => {
                            missing.push(format!("node {} is {}", e.id, r.path.state.as_str()))
                        }
                        None => missing.push(format!("node {} has no node record", e.id)),
                    }
                }
            }
            Ok(other) => missing.push(format!("unexpected node records {other:?}")),
            Err(e) => missing.push(format!("no node records: {e:#}")),
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every node's state digest, once all nodes report the same applied index (the log
/// keeps growing with keep-alives and ticks, so this polls). A mismatch at one index is
/// confirmed over several rounds before it is reported, which rules out a replica
/// caught between applying and publishing its index.
pub async fn digests(client: &CtlClient, nodes: &[u64], timeout: Duration) -> Vec<NodeDigest> {
    let deadline = Instant::now() + timeout;
    let mut mismatches = 0;
    loop {
        let calls = nodes.iter().map(|&node| async move {
            match client
                .call(node, Request::StateDigest, Duration::from_secs(2))
                .await
            {
                Ok(Reply::StateDigest(Ok(d))) => NodeDigest {
                    node,
                    applied: Some(d.applied),
                    digest: Some(hex(&d.digest)),
                    error: String::new(),
                },
                Ok(Reply::StateDigest(Err(e))) => NodeDigest {
                    node,
                    applied: None,
                    digest: None,
                    error: e,
                },
                Ok(other) => NodeDigest {
                    node,
                    applied: None,
                    digest: None,
                    error: format!("unexpected reply {other:?}"),
                },
                Err(e) => NodeDigest {
                    node,
                    applied: None,
                    digest: None,
                    error: format!("{e:#}"),
                },
            }
        });
        let got: Vec<NodeDigest> = futures::future::join_all(calls).await;
        let indexes: std::collections::BTreeSet<_> = got.iter().map(|d| d.applied).collect();
        if indexes.len() == 1 && !indexes.contains(&None) {
            let hashes: std::collections::BTreeSet<_> = got.iter().map(|d| &d.digest).collect();
            if hashes.len() == 1 {
                return got;
            }
            mismatches += 1;
            if mismatches >= 5 {
                return got;
            }
        }
        if Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn paths(client: &CtlClient) -> Vec<NodePath> {
    match client.status().await {
        Ok(st) => st
            .nodes
            .into_iter()
            .map(|n| NodePath {
                node: n.id,
                alive: n.alive,
                path: n.path,
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}
