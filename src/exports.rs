//! The node's NBD service: the volume's files served at `[listen] nbd`, and the node-to-node
//! (and csvctl-to-node) RPC service behind `csvctl export list` and `csvctl migrate`.
//!
//! The NBD side is `nbd_backend::volume::VolumeExports` (exports, write ownership, handoff);
//! this module only starts it, registers [`NBD_SERVICE`] on the node's authenticated RPC, and
//! implements the csvctl commands over that service. Requests and replies are JSON
//! ([`ServiceRequest`], [`ServiceReply`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use csv_core::meta::{LockInfo, LockMode};
use csv_core::volume::{MetaClient, Volume};
use lockmgr::client::NodeMeta;
use lockmgr::node::{ExtHandler, MetaNode};
use lockmgr::rpc::message::{Query, QueryReply, Reply, Request};
use nbd_backend::volume::{ExportsConfig, VolumeExports, owner_key};
use nbd_backend::{ConnectionEvents, ExportProvider, NbdServer, ServerConfig};
use serde::{Deserialize, Serialize};

use crate::client::CtlClient;

/// The RPC service id of the NBD exports (see `MetaNode::register_service`).
pub const NBD_SERVICE: u8 = 4;

/// A request to a node's NBD service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ServiceRequest {
    /// The node's live NBD connections and the exports it owns.
    Connections,
    /// Every export of the volume.
    Exports,
    /// Take write ownership of an export (the target side of `migrate`).
    Claim { export: String },
}

/// A node's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ServiceReply {
    Connections {
        connections: Vec<ClientInfo>,
        owned: Vec<String>,
    },
    Exports(Vec<ExportRow>),
    Claimed {
        handoff_ms: f64,
        token: u64,
        handed_over: bool,
    },
}

/// One NBD client connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub node: u64,
    pub id: u64,
    pub export: String,
    pub peer: String,
    /// The connection's writes go through (its node owns the export).
    pub owner: bool,
    pub writes_revoked: bool,
    pub in_flight: usize,
}

/// One export as `csvctl export list --json` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRow {
    pub name: String,
    pub ino: u64,
    pub size: u64,
    pub format: String,
    /// The file has no write permission bit, so it is served read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The node holding the export's NBD write ownership (owner lock).
    pub owner_node: Option<u64>,
    /// The node holding the file's exclusive data lock, and its fencing token.
    pub write_lock_node: Option<u64>,
    pub write_lock_token: Option<u64>,
    pub clients: Vec<ClientInfo>,
}

/// The running NBD service of a node.
pub struct NbdService {
    server: NbdServer,
    task: tokio::task::JoinHandle<()>,
    /// Kept until the service is dropped (see `shutdown`).
    _runtime: IoRuntime,
}

impl NbdService {
    /// Stops accepting, lets clients finish (bounded by the server's grace period). Keep the
    /// service (its runtime) until the volume has shut down: tasks the volume or the
    /// redirector started while serving an NBD request run on it.
    pub async fn shutdown(&self) {
        self.server.shutdown().await;
        self.task.abort();
    }
}

/// The NBD server's own runtime. Its worker threads do buffered LUN I/O themselves
/// (`InlineIo::allow_page_cache_io_on_this_thread`): page-cache copies inline, which saves two
/// thread hand-offs per request, and reads that miss the cache blocking on one of its many
/// workers, as nbdkit's threads do. Keeping them apart from the main runtime means a throttled
/// write or a slow device delays NBD clients only, never Raft, leases or timers. Dropping it
/// stops its threads without waiting.
pub struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    /// A runtime of `threads` workers named `name`.
    pub fn new(name: &str, threads: usize) -> std::io::Result<IoRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name(name)
            .on_thread_start(csv_core::lun::file::InlineIo::allow_page_cache_io_on_this_thread)
            .enable_all()
            .build()?;
        Ok(IoRuntime(Some(rt)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("runtime present until drop")
            .handle()
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        // `shutdown_background` may run inside another runtime (dropping a runtime there
        // would panic).
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// NBD worker threads: one per core, and at least [`NBD_MIN_THREADS`] (at most 64).
fn nbd_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(NBD_MIN_THREADS, 64)
}

/// A read that misses the page cache blocks an NBD worker thread until the device answers, so
/// the runtime needs enough of them to keep that many reads in flight (nbdkit uses 16 threads
/// per connection). Idle workers only sleep.
const NBD_MIN_THREADS: usize = 16;

/// Serves the volume over NBD at `addr` and registers [`NBD_SERVICE`] on `node`.
pub async fn start(
    node: &Arc<MetaNode>,
    volume: &Volume,
    addr: std::net::SocketAddr,
    section: &crate::config::NbdSection,
) -> anyhow::Result<NbdService> {
    let meta: Arc<dyn MetaClient> = Arc::new(NodeMeta::new(node.clone()));
    let exports = VolumeExports::new(volume.clone(), meta, ExportsConfig::default());
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .with_context(|| format!("cannot listen for NBD on {addr}"))?;
    let runtime = IoRuntime::new("csv-nbd", nbd_threads())
        .context("cannot start the NBD server's runtime")?;
    let server = NbdServer::new(
        Arc::new(exports.clone()) as Arc<dyn ExportProvider>,
        ServerConfig {
            reads: section.read_path(),
            ..ServerConfig::default()
        },
        Some(Arc::new(exports.clone()) as Arc<dyn ConnectionEvents>),
    );
    let s = server.clone();
    let task = runtime.handle().spawn(async move {
        // Registered with this runtime's reactor: accepted connections live here too.
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "NBD listener cannot be registered");
                return;
            }
        };
        if let Err(e) = s.serve_tcp(listener).await {
            tracing::error!(error = %e, "NBD server stopped");
        }
    });
    let id = node.id();
    let handler: ExtHandler = Arc::new(move |_peer, payload| {
        let exports = exports.clone();
        Box::pin(async move {
            serve(id, &exports, &payload)
                .await
                .map_err(|e| format!("{e:#}"))
        })
    });
    node.register_service(NBD_SERVICE, handler);
    tracing::info!(%addr, "serving the volume over NBD");
    Ok(NbdService {
        server,
        task,
        _runtime: runtime,
    })
}

async fn serve(node: u64, exports: &VolumeExports, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let req: ServiceRequest = serde_json::from_slice(payload).context("bad NBD service request")?;
    let reply = match req {
        ServiceRequest::Connections => ServiceReply::Connections {
            connections: exports
                .connections()
                .into_iter()
                .map(|c| ClientInfo {
                    node,
                    id: c.id,
                    export: c.export,
                    peer: c.peer,
                    owner: c.owner,
                    writes_revoked: c.writes_revoked,
                    in_flight: c.in_flight,
                })
                .collect(),
            owned: exports.owned(),
        },
        ServiceRequest::Exports => ServiceReply::Exports(
            exports
                .exports()
                .await
                .context("cannot list the volume's files")?
                .into_iter()
                .map(|e| ExportRow {
                    format: format_of(&e.name).into(),
                    read_only: e.read_only,
                    name: e.name,
                    ino: e.ino,
                    size: e.size,
                    owner_node: None,
                    write_lock_node: None,
                    write_lock_token: None,
                    clients: Vec::new(),
                })
                .collect(),
        ),
        ServiceRequest::Claim { export } => {
            let c = exports
                .claim(&export)
                .await
                .with_context(|| format!("cannot take over export {export:?}"))?;
            ServiceReply::Claimed {
                handoff_ms: c.elapsed.as_secs_f64() * 1e3,
                token: c.token,
                handed_over: c.handed_over,
            }
        }
    };
    Ok(serde_json::to_vec(&reply)?)
}

fn format_of(name: &str) -> &'static str {
    if name.to_ascii_lowercase().ends_with(".vhd") {
        "vhd"
    } else {
        "raw"
    }
}

async fn call(
    c: &CtlClient,
    node: u64,
    req: &ServiceRequest,
    timeout: Duration,
) -> anyhow::Result<ServiceReply> {
    let payload = serde_json::to_vec(req)?;
    match c
        .call(
            node,
            Request::Ext {
                service: NBD_SERVICE,
                payload,
            },
            timeout,
        )
        .await?
    {
        Reply::Ext(Ok(b)) => Ok(serde_json::from_slice(&b).context("bad NBD service reply")?),
        Reply::Ext(Err(e)) => bail!("node {node}: {e}"),
        other => bail!("node {node}: unexpected reply {other:?}"),
    }
}

/// `csvctl export list`: every export, its clients on every node, and the write lock holders.
pub async fn list(c: &CtlClient, nodes: &[u64]) -> anyhow::Result<Vec<ExportRow>> {
    let t = Duration::from_secs(5);
    let mut rows = None;
    let mut last_err = None;
    for n in nodes {
        match call(c, *n, &ServiceRequest::Exports, t).await {
            Ok(ServiceReply::Exports(r)) => {
                rows = Some(r);
                break;
            }
            Ok(other) => last_err = Some(anyhow::anyhow!("node {n}: unexpected {other:?}")),
            Err(e) => last_err = Some(e),
        }
    }
    let Some(mut rows) = rows else {
        return Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no nodes")))
            .context("no node listed the exports");
    };
    let per_node = futures::future::join_all(
        nodes
            .iter()
            .map(|n| call(c, *n, &ServiceRequest::Connections, t)),
    )
    .await;
    let mut clients: BTreeMap<String, Vec<ClientInfo>> = BTreeMap::new();
    for r in per_node.into_iter().flatten() {
        if let ServiceReply::Connections { connections, .. } = r {
            for ci in connections {
                clients.entry(ci.export.clone()).or_default().push(ci);
            }
        }
    }
    let locks = match c.query(Query::Locks).await? {
        QueryReply::Locks(l) => l,
        other => bail!("unexpected answer to a lock query: {other:?}"),
    };
    let by_key: BTreeMap<&str, &LockInfo> = locks.iter().map(|l| (l.key.as_str(), l)).collect();
    for row in &mut rows {
        row.owner_node = by_key
            .get(owner_key(row.ino).as_str())
            .and_then(|l| l.holders.first())
            .map(|h| h.node);
        let data = by_key
            .get(csv_core::meta::data_lock_key(row.ino).as_str())
            .and_then(|l| l.holders.iter().find(|h| h.mode == LockMode::Exclusive));
        row.write_lock_node = data.map(|h| h.node);
        row.write_lock_token = data.map(|h| h.token);
        row.clients = clients.remove(&row.name).unwrap_or_default();
    }
    Ok(rows)
}

/// Prints `rows` as a table.
pub fn print_table(rows: &[ExportRow]) {
    if rows.is_empty() {
        println!("no exports (the volume has no regular files)");
        return;
    }
    println!(
        "{:<32} {:>12} {:<6} {:>5} {:>10}  clients",
        "export", "size", "fmt", "owner", "write-lock"
    );
    for r in rows {
        let lock = match (r.write_lock_node, r.write_lock_token) {
            (Some(n), Some(t)) => format!("{n} (#{t})"),
            _ => "-".into(),
        };
        let clients: Vec<String> = r
            .clients
            .iter()
            .map(|c| {
                let state = if c.writes_revoked {
                    "revoked"
                } else if c.owner {
                    "writer"
                } else {
                    "idle"
                };
                format!("node{}:{}[{state}]", c.node, c.peer)
            })
            .collect();
        println!(
            "{:<32} {:>12} {:<6} {:>5} {:>10}  {}",
            r.name,
            r.size,
            if r.read_only {
                format!("{} ro", r.format)
            } else {
                r.format.clone()
            },
            r.owner_node
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            lock,
            if clients.is_empty() {
                "-".into()
            } else {
                clients.join(", ")
            }
        );
    }
}

/// The result of `csvctl migrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migrated {
    pub export: String,
    pub to: u64,
    /// The claim on the target node: break request, the holder's flush and release, grants.
    pub handoff_ms: f64,
    /// Wall time of the whole command (RPC included).
    pub total_ms: f64,
    pub token: u64,
    pub handed_over: bool,
}

/// `csvctl migrate EXPORT --to K`: node K takes write ownership; returns when it holds it.
pub async fn migrate(c: &CtlClient, export: &str, to: u64) -> anyhow::Result<Migrated> {
    let t0 = Instant::now();
    let req = ServiceRequest::Claim {
        export: export.to_owned(),
    };
    match call(c, to, &req, Duration::from_secs(90)).await? {
        ServiceReply::Claimed {
            handoff_ms,
            token,
            handed_over,
        } => Ok(Migrated {
            export: export.to_owned(),
            to,
            handoff_ms,
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
            token,
            handed_over,
        }),
        other => bail!("node {to}: unexpected {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csv_core::lun::file::InlineIo;

    #[tokio::test]
    async fn nbd_threads_may_do_page_cache_io_and_the_main_runtime_may_not() {
        let rt = IoRuntime::new("t-nbd", 2).unwrap();
        let (allowed, name) = rt
            .handle()
            .spawn(async {
                (
                    InlineIo::page_cache_allowed(),
                    std::thread::current().name().map(str::to_owned),
                )
            })
            .await
            .unwrap();
        assert!(allowed);
        assert_eq!(name.as_deref(), Some("t-nbd"));
        assert!(
            !InlineIo::page_cache_allowed(),
            "main runtime threads stay async-only"
        );
        // Dropped inside a runtime: must not panic, and its tasks stop.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        rt.handle().spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(rt);
        assert!(
            rx.await.is_err(),
            "a task of a dropped NBD runtime lives on"
        );
    }
}
