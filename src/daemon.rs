//! The `csvd` node daemon: attaches the LUN, joins the metadata service, serves
//! until SIGTERM/SIGINT, then leaves gracefully.
//!
//! Start-up order matters:
//! 1. read the cluster secret and the LUN superblock (a LUN that is not a csvd volume,
//!    or is damaged, is refused before anything joins the cluster);
//! 2. start the metadata node (bootstrap or join, open the session);
//! 3. check the LUN against the cluster's volume record (a different volume UUID
//!    means the wrong LUN is attached: refuse and leave), or record it if the cluster
//!    has none yet;
//! 4. open the volume layer over the node's metadata client and the LUN, and mount it
//!    through FUSE at the configured mountpoint (a stale mount there is removed first);
//! 5. serve the volume's files over NBD at `[listen] nbd` (`exports.rs`).
//!
//! Stopping reverses it: stop the NBD server (clients get a grace period), unmount (no new requests), write back and release the
//! volume's locks and reservation, then close the session and leave.

use std::sync::Arc;

use anyhow::{Context, bail};
use csv_core::lun::Lun;
use csv_core::meta::{MetaError, VolumeInfo};
use csv_core::superblock::Superblock;
use csv_core::volume::{MetaClient, Volume, VolumeConfig};
use lockmgr::client::NodeMeta;
use lockmgr::node::{MetaConfig, MetaNode, step};
use lockmgr::rpc::auth::ClusterKey;
use lockmgr::rpc::message::{Query, QueryReply};
use lockmgr::types::{Op, Response};

use crate::config::NodeConfig;

/// Bound of each step of a graceful stop (SIGTERM); `cluster down` waits 20 s in all.
const STOP_STEP: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs one node until it is told to stop.
pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let secret = std::fs::read(&cfg.secret_file)
        .with_context(|| format!("cannot read secret file {}", cfg.secret_file.display()))?;
    let key = ClusterKey::from_secret(&secret)?;
    // A previous incarnation's mount may still be there, its FUSE connection keeping that
    // process (and its hold on the Raft store) alive: abort it before anything else.
    if let Some(m) = cfg
        .mountpoint
        .as_ref()
        .filter(|p| !p.as_os_str().is_empty())
    {
        fuse_frontend::cleanup_stale_mount(m);
    }

    let opts = csv_core::lun::LunOpenOptions {
        file: csv_core::lun::FileLunOptions {
            cache: csv_core::lun::CacheMode::from_config(cfg.lun_direct),
            read_only: false,
        },
        ..Default::default()
    };
    let san = step("attach the LUN", redirector::open_san_path(&cfg.lun, &opts))
        .await
        .with_context(|| format!("cannot attach LUN {}", cfg.lun))?;
    let lun: Arc<dyn Lun> = san.clone();
    let sb = step(
        "read the superblock",
        csv_core::superblock::read(lun.as_ref()),
    )
    .await
    .with_context(|| format!("LUN {} is not usable", cfg.lun))?;
    sb.verify_attach(None, lun.size())
        .with_context(|| format!("LUN {} refused", cfg.lun))?;
    tracing::info!(lun = %lun.describe(), volume = %sb.uuid_string(), "LUN attached");

    let mut meta = MetaConfig::new(cfg.node_id, cfg.listen.rpc, cfg.data_dir.join("raft"), key);
    meta.rpc_advertise = cfg
        .listen
        .advertise_rpc
        .clone()
        .unwrap_or_else(|| cfg.listen.rpc.to_string());
    meta.nbd_addr = cfg.listen.nbd.to_string();
    meta.mount = cfg
        .mountpoint
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    meta.seeds = cfg.peers.clone();
    meta.bootstrap = cfg.bootstrap;
    meta.heartbeat_ms = cfg.raft.heartbeat_ms;
    meta.election_timeout_min_ms = cfg.raft.election_timeout_min_ms;
    meta.election_timeout_max_ms = cfg.raft.election_timeout_max_ms;
    meta.snapshot_logs = cfg.raft.snapshot_logs;
    meta.voter_replace_after_ms = cfg.raft.voter_replace_after_ms;
    meta.session_ttl_ms = cfg.session.ttl_ms;

    let node = MetaNode::start(meta)
        .await
        .context("cannot start the metadata service")?;
    tracing::info!(node = node.id(), rpc = %node.rpc_addr(), "joined the cluster");

    if let Err(e) = step(
        "check the volume record",
        check_volume(&node, &sb, lun.as_ref()),
    )
    .await
    {
        node.shutdown().await;
        return Err(e);
    }
    // From here on the node's block I/O goes through the redirector (SAN path or a peer).
    let lun: Arc<dyn Lun> = Arc::new(crate::redirect::attach(&cfg, &node, san)?);
    tracing::info!(lun = %lun.describe(), "I/O redirector running");

    let (volume, mount) = match step(
        "open and mount the volume",
        attach_volume(&cfg, &node, lun.clone()),
    )
    .await
    {
        Ok(x) => x,
        Err(e) => {
            node.shutdown().await;
            return Err(e);
        }
    };

    let nbd = match step(
        "start the NBD server",
        crate::exports::start(&node, &volume, cfg.listen.nbd, &cfg.nbd),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            node.shutdown().await;
            return Err(e);
        }
    };

    wait_for_stop(&node).await;
    tracing::info!("stopping: unmounting, releasing locks and leaving");
    // Each step is bounded: the last nodes of a cluster going down have no quorum left,
    // and a stopping node must still exit (what it could not write back was never
    // acknowledged as durable, and its reservations return to the pool with its session).
    if tokio::time::timeout(STOP_STEP, nbd.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("NBD connections did not drain in {STOP_STEP:?}");
    }
    if let Some(m) = mount {
        match tokio::task::spawn_blocking(move || m.unmount()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "unmount failed"),
            Err(e) => tracing::warn!(error = %e, "unmount task failed"),
        }
    }
    match tokio::time::timeout(STOP_STEP * 2, volume.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "volume write-back on shutdown failed"),
        Err(_) => tracing::warn!("volume write-back did not finish (no metadata quorum?)"),
    }
    node.shutdown().await;
    // Only now: tasks started while serving NBD requests (the redirector's, the volume's)
    // may run on the NBD runtime.
    drop(nbd);
    Ok(())
}

/// Opens the volume layer and mounts it (if a mountpoint is configured).
async fn attach_volume(
    cfg: &NodeConfig,
    node: &Arc<MetaNode>,
    lun: Arc<dyn Lun>,
) -> anyhow::Result<(Volume, Option<fuse_frontend::FuseMount>)> {
    let meta: Arc<dyn MetaClient> = Arc::new(NodeMeta::new(node.clone()));
    let volume = Volume::open(meta, lun, VolumeConfig::default())
        .await
        .context("cannot open the volume")?;
    let mount = match &cfg.mountpoint {
        Some(path) if !path.as_os_str().is_empty() => {
            let (v, p, rt) = (
                volume.clone(),
                path.clone(),
                tokio::runtime::Handle::current(),
            );
            let m = tokio::task::spawn_blocking(move || {
                fuse_frontend::mount(v, &p, rt, fuse_frontend::MountOptions::default())
            })
            .await
            .context("mount task failed")?
            .with_context(|| format!("cannot mount the volume at {}", path.display()))?;
            Some(m)
        }
        _ => None,
    };
    Ok((volume, mount))
}

/// The cluster's volume must be the one on this LUN.
async fn check_volume(node: &Arc<MetaNode>, sb: &Superblock, lun: &dyn Lun) -> anyhow::Result<()> {
    let ours = VolumeInfo {
        uuid: sb.uuid_string(),
        block_size: sb.block_size,
        total_blocks: sb.volume_size / u64::from(sb.block_size),
        data_start_block: sb.data_start_block,
    };
    for _ in 0..2 {
        let QueryReply::Volume(recorded) = node.query(Query::Volume).await? else {
            bail!("unexpected answer to a volume query");
        };
        match recorded {
            Some(v) if v.uuid == ours.uuid => return Ok(()),
            Some(v) => bail!(
                "wrong LUN: {} holds volume {}, but this cluster's volume is {}",
                lun.describe(),
                ours.uuid,
                v.uuid
            ),
            None => match node.write(Op::InitVolume { info: ours.clone() }).await? {
                Response::Ok | Response::Err(MetaError::Invalid(_)) => continue,
                other => bail!("recording the volume failed: {other:?}"),
            },
        }
    }
    bail!("the volume record did not settle")
}

async fn wait_for_stop(node: &MetaNode) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        node.stopped().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = node.stopped() => {}
    }
}
