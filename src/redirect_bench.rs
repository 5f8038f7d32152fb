//! `csvctl bench redirect`: what redirection costs and how long failover stalls, measured on a
//! local cluster through the real path (client -> node K's LUN -> SAN path or a peer).
//!
//! 1. The same verifying workload on node K, first direct, then redirected through a peer
//!    (the operator's maintenance redirect, `csvctl path redirect`): throughput and latency.
//! 2. The failover stall: repeated injections of `san-down` and `san-hang` (alternating) on node
//!    K during a 4 KiB workload; the stall of one injection is the slowest request around it.
//!    Between injections the path is restored and the node fails back to direct.
//!
//! Every run is also checked (no errors, no rolled-back reads).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cluster::{Children, ClusterFile};
use crate::fault::{self, Fault};
use crate::redirect::{DiagReply, DiagRequest, diag};
use crate::workload::{Report, Workload};

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub mode: String,
    pub mib_per_s: f64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedirectBench {
    pub node: u64,
    pub block_size: usize,
    pub workers: usize,
    pub secs: u64,
    pub rows: Vec<Row>,
    /// Redirected throughput as a fraction of direct.
    pub ratio: f64,
    /// Stall of every injection (ms), in order; kinds alternate san-down, san-hang.
    pub stalls_ms: Vec<f64>,
    pub stall_p50_ms: f64,
    pub stall_p99_ms: f64,
    pub stall_max_ms: f64,
}

fn row(mode: &str, r: &Report) -> Row {
    Row {
        mode: mode.into(),
        mib_per_s: r.mib_per_s(),
        ops_per_s: r.ops_per_s(),
        p50_ms: r.p50_ms,
        p99_ms: r.p99_ms,
        max_ms: r.max_ms,
    }
}

async fn path_of(cluster: &ClusterFile, node: u64) -> anyhow::Result<String> {
    let st = cluster.client()?.status().await?;
    Ok(st
        .nodes
        .iter()
        .find(|n| n.id == node)
        .map(|n| n.path.clone())
        .unwrap_or_default())
}

async fn wait_path(dir: &Path, node: u64, want: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let cluster = ClusterFile::load(dir)?;
        if path_of(&cluster, node).await? == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("node {node} did not become {want} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn timed(cluster: &ClusterFile, w: &Workload, secs: f64) -> anyhow::Result<Report> {
    let stop = Arc::new(AtomicBool::new(false));
    let client = Arc::new(cluster.client()?);
    let run = tokio::spawn({
        let (w, stop) = (w.clone(), stop.clone());
        async move { w.run(client, stop).await }
    });
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let r = run.await.context("workload task failed")?;
    if !r.errors.is_empty() || !r.violations.is_empty() {
        bail!(
            "the workload saw errors {:?} / violations {:?}",
            r.errors,
            r.violations
        );
    }
    Ok(r)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

/// Runs the benchmark on node `node` of the cluster in `dir` (started with `--san nbdkit`).
pub async fn run(
    dir: &Path,
    node: u64,
    secs: u64,
    injections: usize,
    block_size: usize,
    workers: usize,
) -> anyhow::Result<RedirectBench> {
    let cluster = ClusterFile::load(dir)?;
    if 512 + injections as u64 * 4 > cluster.lun.metadata().map(|m| m.len() >> 20).unwrap_or(0) {
        bail!("the LUN is too small for {injections} injections (needs 512 MiB + 4 MiB each)");
    }
    if workers as u64 * 64 * block_size as u64 > 128 << 20 {
        bail!("--workers x 64 blocks x --block-size must fit in 128 MiB");
    }
    let client = cluster.client()?;
    let w = Workload {
        node,
        workers,
        blocks_per_worker: 64,
        block_size,
        region: 128 << 20,
        write_pct: 50,
        seed: rand::random(),
    };
    eprintln!("direct run ({secs} s) ...");
    let direct = timed(&cluster, &w, secs as f64).await?;
    expect_done(
        diag(
            &client,
            node,
            &DiagRequest::UserRedirect(true),
            Duration::from_secs(10),
        )
        .await?,
    )?;
    wait_path(dir, node, "redirected", Duration::from_secs(10)).await?;
    eprintln!("redirected run ({secs} s) ...");
    // A fresh region: the checker knows only what this run wrote.
    let wr = Workload {
        region: 256 << 20,
        ..w.clone()
    };
    let redirected = timed(&cluster, &wr, secs as f64).await;
    expect_done(
        diag(
            &client,
            node,
            &DiagRequest::UserRedirect(false),
            Duration::from_secs(10),
        )
        .await?,
    )?;
    let redirected = redirected?;
    wait_path(dir, node, "direct", Duration::from_secs(30)).await?;

    let small = Workload {
        block_size: 4096,
        blocks_per_worker: 16,
        region: 512 << 20,
        ..w.clone()
    };
    let mut stalls = Vec::new();
    let mut children = Children::default();
    let csvd = crate::cluster::default_csvd_binary();
    for i in 0..injections {
        let kind = if i % 2 == 0 {
            Fault::SanDown
        } else {
            Fault::SanHang
        };
        let stop = Arc::new(AtomicBool::new(false));
        let w = Workload {
            region: small.region + i as u64 * (4 << 20),
            ..small.clone()
        };
        let run = tokio::spawn({
            let (w, stop, c) = (w, stop.clone(), Arc::new(cluster.client()?));
            async move { w.run(c, stop).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::task::block_in_place(|| fault::inject(dir, node, kind, &mut children, &csvd))?;
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        stop.store(true, Ordering::Relaxed);
        let r = run.await.context("workload task failed")?;
        if !r.errors.is_empty() || !r.violations.is_empty() {
            bail!(
                "injection {i}: errors {:?} / violations {:?}",
                r.errors,
                r.violations
            );
        }
        eprintln!("injection {i} ({kind:?}): stall {:.0} ms", r.max_ms);
        stalls.push(r.max_ms);
        tokio::task::block_in_place(|| {
            fault::inject(dir, node, Fault::SanUp, &mut children, &csvd)
        })?;
        wait_path(dir, node, "direct", Duration::from_secs(120)).await?;
    }
    std::mem::forget(children);
    let mut sorted = stalls.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(RedirectBench {
        node,
        block_size,
        workers,
        secs,
        ratio: redirected.mib_per_s() / direct.mib_per_s().max(f64::MIN_POSITIVE),
        rows: vec![row("direct", &direct), row("redirected", &redirected)],
        stall_p50_ms: pct(&sorted, 0.5),
        stall_p99_ms: pct(&sorted, 0.99),
        stall_max_ms: sorted.last().copied().unwrap_or(0.0),
        stalls_ms: stalls,
    })
}

/// The Markdown table of a run.
pub fn table(b: &RedirectBench) -> String {
    let mut s = String::from(
        "| path | MiB/s | ops/s | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n",
    );
    for r in &b.rows {
        s.push_str(&format!(
            "| {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.1} |\n",
            r.mode, r.mib_per_s, r.ops_per_s, r.p50_ms, r.p99_ms, r.max_ms
        ));
    }
    s.push_str(&format!(
        "\nredirected / direct throughput: {:.0}%\n\nfailover stall over {} injections (san-down and san-hang alternating): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms\n",
        b.ratio * 100.0,
        b.stalls_ms.len(),
        b.stall_p50_ms,
        b.stall_p99_ms,
        b.stall_max_ms
    ));
    s
}

fn expect_done(r: DiagReply) -> anyhow::Result<()> {
    match r {
        DiagReply::Done => Ok(()),
        other => bail!("unexpected answer {other:?}"),
    }
}
