//! `csvctl bench meta`: metadata operations per second and their latency, measured
//! through the real path (csvctl -> any node -> leader -> Raft commit on a quorum).
//!
//! Workers are spread round-robin over the nodes, as clients of a cluster would be.
//! Each worker runs its operations back to back; throughput comes from concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use csv_core::meta::{FileKind, ROOT_INO};
use csv_core::op::{Op, Response};
use lockmgr::rpc::message::{Reply, Request};
use serde::Serialize;

use crate::client::CtlClient;
use crate::cluster::ClusterFile;

/// The figures of one operation kind.
#[derive(Debug, Clone, Serialize)]
pub struct OpStats {
    pub op: String,
    pub nodes: usize,
    pub concurrency: usize,
    pub count: usize,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn stats(
    op: &str,
    nodes: usize,
    concurrency: usize,
    wall: Duration,
    mut lat: Vec<Duration>,
) -> OpStats {
    lat.sort();
    let pct = |p: f64| {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1000.0
    };
    OpStats {
        op: op.into(),
        nodes,
        concurrency,
        count: lat.len(),
        seconds: wall.as_secs_f64(),
        ops_per_sec: lat.len() as f64 / wall.as_secs_f64().max(1e-9),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: lat.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
    }
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `ops` creates and `ops` lock acquire/release pairs with `concurrency` workers.
pub async fn meta(
    cluster: &ClusterFile,
    ops: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<OpStats>> {
    if concurrency == 0 || ops < concurrency {
        bail!("need at least one operation per worker (ops {ops}, concurrency {concurrency})");
    }
    let client = Arc::new(cluster.client()?);
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    let run = std::process::id();
    // A directory for this run's entries.
    let dir = match submit(
        &client,
        ids[0],
        mkdir(format!("bench-{run}-{}", rand::random::<u32>())),
    )
    .await?
    {
        Response::Attr(a) => a.ino,
        other => bail!("cannot create the bench directory: {other:?}"),
    };
    let per = ops / concurrency;

    // 1. create an entry
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (client, node) = (client.clone(), ids[w % ids.len()]);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let op = Op::Create {
                    parent: dir,
                    name: format!("f-{w}-{i}"),
                    kind: FileKind::File,
                    perm: 0o644,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    symlink: None,
                };
                let t = Instant::now();
                match submit(&client, node, op).await? {
                    Response::Attr(_) => lat.push(t.elapsed()),
                    other => bail!("create refused: {other:?}"),
                }
            }
            Ok(lat)
        }));
    }
    let create = collect(tasks).await?;
    let create_wall = t0.elapsed();

    // 2. acquire and release a lock (distinct keys per worker: measures the service, not contention)
    let t0 = Instant::now();
    type Pairs = anyhow::Result<(Vec<Duration>, Vec<Duration>)>;
    let mut tasks: Vec<tokio::task::JoinHandle<Pairs>> = Vec::new();
    for w in 0..concurrency {
        let (client, node) = (client.clone(), ids[w % ids.len()]);
        tasks.push(tokio::spawn(async move {
            let mut acq = Vec::with_capacity(per);
            let mut rel = Vec::with_capacity(per);
            for i in 0..per {
                let key = format!("bench-{run}-{w}-{}", i % 4);
                let t = Instant::now();
                lock(
                    &client,
                    node,
                    Request::LockAcquire {
                        key: key.clone(),
                        exclusive: true,
                    },
                )
                .await?;
                acq.push(t.elapsed());
                let t = Instant::now();
                lock(&client, node, Request::LockRelease { key }).await?;
                rel.push(t.elapsed());
            }
            Ok((acq, rel))
        }));
    }
    let mut acquire = Vec::new();
    let mut release = Vec::new();
    for t in tasks {
        let (a, r) = t.await.context("bench worker panicked")??;
        acquire.extend(a);
        release.extend(r);
    }
    let lock_wall = t0.elapsed();
    let n = ids.len();
    let pair: Vec<Duration> = acquire.iter().zip(&release).map(|(a, r)| *a + *r).collect();
    Ok(vec![
        stats("create entry", n, concurrency, create_wall, create),
        stats("lock acquire", n, concurrency, lock_wall, acquire),
        stats("lock release", n, concurrency, lock_wall, release),
        stats("lock acquire+release", n, concurrency, lock_wall, pair),
    ])
}

fn mkdir(name: String) -> Op {
    Op::Create {
        parent: ROOT_INO,
        name,
        kind: FileKind::Dir,
        perm: 0o755,
        uid: 0,
        gid: 0,
        rdev: 0,
        symlink: None,
    }
}

async fn submit(client: &CtlClient, node: u64, op: Op) -> anyhow::Result<Response> {
    match client.call(node, Request::Submit(op), TIMEOUT).await? {
        Reply::Write(Ok(r)) => Ok(r),
        Reply::Write(Err(e)) => bail!("node {node}: {e}"),
        other => bail!("node {node}: unexpected reply {other:?}"),
    }
}

async fn lock(client: &CtlClient, node: u64, req: Request) -> anyhow::Result<()> {
    match client.call(node, req, TIMEOUT).await? {
        Reply::Lock(Ok(_)) => Ok(()),
        Reply::Lock(Err(e)) => bail!("node {node}: {e}"),
        other => bail!("node {node}: unexpected reply {other:?}"),
    }
}

async fn collect(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<Duration>>>>,
) -> anyhow::Result<Vec<Duration>> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("bench worker panicked")??);
    }
    Ok(all)
}

/// A markdown table of results.
pub fn table(rows: &[OpStats]) -> String {
    let mut s = String::from(
        "| nodes | operation | concurrency | ops | ops/s | p50 ms | p99 ms | max ms |\n|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} |\n",
            r.nodes, r.op, r.concurrency, r.count, r.ops_per_sec, r.p50_ms, r.p99_ms, r.max_ms
        ));
    }
    s
}
