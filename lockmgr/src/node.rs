//! One metadata node: Raft, the RPC server, cluster membership, the node's session,
//! and the client API the rest of csvd uses.
//!
//! Invariants:
//! - Only the leader stamps time into commands (`Command::now_ms`), from its clock seam.
//! - A new leader proposes `ExtendSessions` before its first `Tick`, so no session
//!   expires sooner than one TTL after a leader change.
//! - A node considers its session valid only until `sent + ttl - margin`, where `sent`
//!   is when the last successful keep-alive was *sent*: it stops writing (self-fences)
//!   before any other node can see the session expire.
//! - Writes are retried on another leader only when they were certainly not applied
//!   (refused as "not leader" or never sent); a timeout is reported as indeterminate.
//! - Linearizable reads use ReadIndex: the leader confirms its leadership with a quorum
//!   and answers its commit index; the reading node waits until it has applied that
//!   index and reads its own replica (learners included).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use csv_core::meta::{FencingToken, LockMode, MetaError, NodeId, SessionId};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, LogId, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::network::Network;
use crate::rpc::auth::ClusterKey;
use crate::rpc::message::{
    LeaderError, NodeStatus, Query, QueryReply, Reply, Request, StateDigest,
};
use crate::rpc::{self, RpcClient, RpcError};
use crate::state::VolumeState;
use crate::store::{self, StateMachineData};
use crate::types::{Command, Op, Origin, Raft, RaftNode, Response};

impl StateMachineData for VolumeState {
    fn apply(&mut self, cmd: &Command) -> Response {
        VolumeState::apply(self, cmd)
    }
}

/// The leader's clock. Tests may replace it; production uses the system clock.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// How a metadata node runs.
#[derive(Clone)]
pub struct MetaConfig {
    pub node_id: NodeId,
    /// Where the RPC server listens.
    pub rpc_listen: SocketAddr,
    /// What peers dial to reach this node (usually the same as `rpc_listen`).
    pub rpc_advertise: String,
    pub nbd_addr: String,
    pub mount: String,
    /// Raft store directory.
    pub data_dir: PathBuf,
    pub key: ClusterKey,
    /// Peers to join through (any member will do).
    pub seeds: Vec<String>,
    /// Initialise a new cluster with this node as its only voter, if it has no state yet.
    pub bootstrap: bool,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub session_ttl_ms: u64,
    /// A voter without a live session for this long is replaced by a healthy learner.
    pub voter_replace_after_ms: u64,
    /// Build a snapshot after this many log entries (and purge the log behind it).
    pub snapshot_logs: u64,
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for MetaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaConfig")
            .field("node_id", &self.node_id)
            .field("rpc_listen", &self.rpc_listen)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl MetaConfig {
    /// Defaults for everything but identity and addresses.
    pub fn new(
        node_id: NodeId,
        rpc_listen: SocketAddr,
        data_dir: PathBuf,
        key: ClusterKey,
    ) -> Self {
        MetaConfig {
            node_id,
            rpc_listen,
            rpc_advertise: rpc_listen.to_string(),
            nbd_addr: String::new(),
            mount: String::new(),
            data_dir,
            key,
            seeds: Vec::new(),
            bootstrap: false,
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            session_ttl_ms: 10_000,
            voter_replace_after_ms: 30_000,
            snapshot_logs: 5_000,
            clock: Arc::new(SystemClock),
        }
    }

    /// The self-fence margin: a node stops writing this long before its TTL runs out.
    pub fn fence_margin_ms(&self) -> u64 {
        (self.session_ttl_ms / 5).max(200)
    }

    /// Voters wanted for a cluster of `members` nodes.
    pub fn desired_voters(members: usize) -> usize {
        match members {
            0..=2 => 1,
            3..=6 => 3,
            _ => 5,
        }
    }
}

/// What the metadata node failed to do.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot open the Raft store")]
    Store(#[source] store::StoreError),
    #[error("cannot listen for RPC on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid Raft configuration: {0}")]
    Config(String),
    #[error("Raft failed: {0}")]
    Raft(String),
    #[error("no metadata leader reachable within {0:?}")]
    NoLeader(Duration),
    #[error("the metadata write may or may not have been applied: {0}")]
    Indeterminate(String),
    #[error("metadata RPC failed")]
    Rpc(#[from] RpcError),
    #[error("could not join the cluster through any of {0:?}")]
    Join(Vec<String>),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("this node has no live metadata session")]
    NoSession,
    #[error("peer service refused: {0}")]
    Service(String),
}

/// This node's lease, as the data path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Not opened yet.
    Opening,
    /// Valid until `valid_until` (local monotonic time, already minus the margin).
    Live { id: SessionId, valid_until: Instant },
    /// The session could not be renewed in time or was expired by the cluster.
    /// Locks it held are presumed gone; the node reopens a new session.
    Lost { previous: SessionId },
}

/// Serials of this process's writes, for exactly-once retries.
struct Serials {
    incarnation: u64,
    next: std::sync::atomic::AtomicU64,
    in_flight: std::sync::Mutex<BTreeSet<u64>>,
}

impl Serials {
    fn new() -> Self {
        Serials {
            incarnation: rand::random(),
            next: std::sync::atomic::AtomicU64::new(1),
            in_flight: std::sync::Mutex::new(BTreeSet::new()),
        }
    }

    fn begin(&self) -> u64 {
        let s = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(s);
        s
    }

    fn end(&self, serial: u64) {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&serial);
    }

    fn origin(&self, node: NodeId, serial: u64) -> Origin {
        let answered_below = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first()
            .copied()
            .unwrap_or(serial);
        Origin {
            node,
            incarnation: self.incarnation,
            serial,
            answered_below,
        }
    }
}

/// A running metadata node.
pub struct MetaNode {
    cfg: MetaConfig,
    raft: Raft,
    state: Arc<RwLock<VolumeState>>,
    applied: watch::Receiver<Option<LogId<NodeId>>>,
    /// The store's change feed (applied commands), for the volume layer.
    feed: tokio::sync::broadcast::Sender<csv_core::volume::Applied>,
    peers: Mutex<HashMap<String, Arc<RpcClient>>>,
    session_tx: watch::Sender<SessionState>,
    /// Stops the RPC server (last, so peers can still commit our goodbye).
    cancel: CancellationToken,
    /// Stops keep-alive and leader duties (first, so no session is reopened).
    loops: CancellationToken,
    /// Fired when someone asks this node to stop.
    stop_requested: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    local_addr: SocketAddr,
    ext: RwLock<HashMap<u8, ExtHandler>>,
    serials: Serials,
}

/// A service registered on the node's RPC server (see [`MetaNode::register_service`]).
pub type ExtHandler = Arc<
    dyn Fn(
            NodeId,
            Vec<u8>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>>
        + Send
        + Sync,
>;

impl std::fmt::Debug for MetaNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaNode")
            .field("id", &self.cfg.node_id)
            .finish_non_exhaustive()
    }
}

/// How long a start-up step may run before it is reported as slow (and again each time).
const SLOW_STEP: Duration = Duration::from_secs(5);
/// How long start-up waits for a previous incarnation of this node to release its store.
const STORE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Runs one start-up step, logging when it is slow (every [`SLOW_STEP`] while it runs) and
/// how long it took, so that a node stuck in start-up says where.
pub async fn step<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    tokio::pin!(fut);
    loop {
        match tokio::time::timeout(SLOW_STEP, &mut fut).await {
            Ok(v) => {
                let took = started.elapsed();
                if took >= SLOW_STEP {
                    tracing::info!(
                        step = what,
                        took_ms = took.as_millis() as u64,
                        "start-up step done"
                    );
                } else {
                    tracing::debug!(
                        step = what,
                        took_ms = took.as_millis() as u64,
                        "start-up step done"
                    );
                }
                return v;
            }
            Err(_) => tracing::warn!(
                step = what,
                waited_s = started.elapsed().as_secs(),
                "start-up step still running"
            ),
        }
    }
}

/// Opens the Raft store, waiting (bounded) while a previous incarnation of this node still
/// holds it: a killed process keeps its files open until its last thread has left the
/// kernel.
async fn open_store(
    dir: &std::path::Path,
) -> Result<(store::LogStore, store::StateMachineStore<VolumeState>), NodeError> {
    let deadline = Instant::now() + STORE_LOCK_WAIT;
    let mut warned = false;
    loop {
        match store::open::<VolumeState>(dir) {
            Err(store::StoreError::Open {
                source: redb::DatabaseError::DatabaseAlreadyOpen,
                path,
            }) if Instant::now() < deadline => {
                if !warned {
                    tracing::warn!(path = %path.display(), "the metadata store is still held by another process (a previous csvd?); waiting");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other.map_err(NodeError::Store),
        }
    }
}

const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A forwarded write or ReadIndex unanswered this long is retried (safe: writes are
/// exactly-once, reads idempotent); about one election timeout, so a paused leader
/// costs little more than the election.
const FORWARD_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a proposal on this node may wait for its commit before it is retried (a retry
/// is deduplicated by its origin, so it is applied at most once).
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a proposal may still be answered after this node stopped being the leader.
const LOST_LEADERSHIP_GRACE: Duration = Duration::from_millis(200);
const WRITE_DEADLINE: Duration = Duration::from_secs(15);
/// How long a stopping node tries to close its session and hand over its voter seat.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How many session TTLs a node waits for its previous session to expire before opening a new
/// one anyway (see `MetaNode::wait_out_previous_session`).
const PREVIOUS_SESSION_WAIT: u32 = 3;

impl MetaNode {
    /// Opens the store, starts Raft and the RPC server, bootstraps or joins, and opens
    /// this node's session. Returns once the node is a member with a live session.
    pub async fn start(cfg: MetaConfig) -> Result<Arc<MetaNode>, NodeError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            NodeError::Config(format!("cannot create {}: {e}", cfg.data_dir.display()))
        })?;
        let (log_store, sm) = step("open the metadata store", open_store(&cfg.data_dir)).await?;
        let state = sm.state();
        let applied = sm.applied();
        let feed = sm.feed();
        let raft_cfg = openraft::Config {
            cluster_name: "csvd".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            install_snapshot_timeout: 5_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs),
            max_in_snapshot_log_to_keep: cfg.snapshot_logs.min(1_000),
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::Config(e.to_string()))?;
        let raft = step(
            "start Raft",
            Raft::new(
                cfg.node_id,
                Arc::new(raft_cfg),
                Network::new(cfg.key.clone(), cfg.node_id),
                log_store,
                sm,
            ),
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;

        let listener =
            TcpListener::bind(cfg.rpc_listen)
                .await
                .map_err(|source| NodeError::Listen {
                    addr: cfg.rpc_listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| NodeError::Listen {
            addr: cfg.rpc_listen,
            source,
        })?;
        let node = Arc::new(MetaNode {
            cfg: cfg.clone(),
            raft,
            state,
            applied,
            feed,
            peers: Mutex::new(HashMap::new()),
            session_tx: watch::channel(SessionState::Opening).0,
            cancel: CancellationToken::new(),
            loops: CancellationToken::new(),
            stop_requested: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
            local_addr,
            ext: RwLock::new(HashMap::new()),
            serials: Serials::new(),
        });
        let handler: rpc::Handler = {
            let weak = Arc::downgrade(&node);
            Arc::new(move |peer, req| {
                let weak = weak.clone();
                Box::pin(async move {
                    match weak.upgrade() {
                        Some(node) => node.handle(peer, req).await,
                        None => Reply::Refused("node is shutting down".into()),
                    }
                })
            })
        };
        let server = tokio::spawn(rpc::serve(
            listener,
            cfg.key.clone(),
            cfg.node_id,
            handler,
            node.cancel.clone(),
        ));
        node.tasks.lock().await.push(server);

        step("join the cluster", node.join_or_bootstrap()).await?;
        step("wait for membership and a leader", node.wait_member()).await?;
        step(
            "register this node",
            node.write(Op::RegisterNode {
                node: cfg.node_id,
                rpc_addr: cfg.rpc_advertise.clone(),
                nbd_addr: cfg.nbd_addr.clone(),
                mount: cfg.mount.clone(),
            }),
        )
        .await?;
        // Leader duties run before this node has a session: a node that comes back waits for its
        // old session to expire, and when every node comes back at once, whichever leads must
        // be the one expiring the old sessions.
        let duties = tokio::spawn(node.clone().leader_loop());
        node.tasks.lock().await.push(duties);
        if let Err(e) = step("open the session", node.open_session()).await {
            node.loops.cancel();
            return Err(e);
        }
        let keepalive = tokio::spawn(node.clone().keepalive_loop());
        node.tasks.lock().await.push(keepalive);
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.cfg.node_id
    }

    pub fn config(&self) -> &MetaConfig {
        &self.cfg
    }

    /// The address the RPC server actually listens on.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Reads this node's replica (possibly stale; for attributes and listings with short TTLs).
    pub fn read_local<R>(&self, f: impl FnOnce(&VolumeState) -> R) -> R {
        let guard = self.state.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    /// A linearizable read: sees every write acknowledged before it started.
    pub async fn read<R>(&self, f: impl FnOnce(&VolumeState) -> R) -> Result<R, NodeError> {
        let index = self.read_index().await?;
        self.wait_applied(index).await?;
        Ok(self.read_local(f))
    }

    /// The change feed: every command this replica applies, in log order, after the
    /// state includes it.
    pub fn subscribe_applied(&self) -> tokio::sync::broadcast::Receiver<csv_core::volume::Applied> {
        self.feed.subscribe()
    }

    /// A linearizable barrier: waits until this replica has applied everything
    /// committed before the call.
    pub async fn barrier(&self) -> Result<(), NodeError> {
        let index = self.read_index().await?;
        self.wait_applied(index).await
    }

    /// Waits until this replica has applied log index `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<(), NodeError> {
        let mut rx = self.applied.clone();
        let wait = rx.wait_for(|a| a.map(|l| l.index).unwrap_or(0) >= index);
        match tokio::time::timeout(WRITE_DEADLINE, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(NodeError::Raft("state machine closed".into())),
            Err(_) => Err(NodeError::NoLeader(WRITE_DEADLINE)),
        }
    }

    async fn read_index(&self) -> Result<u64, NodeError> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        loop {
            let leader = self.current_leader();
            let res = match leader {
                Some(l) if l == self.cfg.node_id => self.local_read_index().await,
                Some(l) => match self.peer_for(l).await {
                    Some(c) => match c.call(Request::ReadIndex, FORWARD_TIMEOUT).await {
                        Ok(Reply::ReadIndex(r)) => r,
                        Ok(_) => Err(LeaderError::Unavailable("unexpected reply".into())),
                        Err(e) => Err(LeaderError::Unavailable(e.to_string())),
                    },
                    None => Err(LeaderError::NotLeader {
                        leader: Some(l),
                        leader_addr: None,
                    }),
                },
                None => Err(LeaderError::NotLeader {
                    leader: None,
                    leader_addr: None,
                }),
            };
            match res {
                Ok(i) => return Ok(i),
                Err(_) if Instant::now() < deadline => self.wait_leader_change(leader).await,
                Err(_) => return Err(NodeError::NoLeader(WRITE_DEADLINE)),
            }
        }
    }

    async fn local_read_index(&self) -> Result<u64, LeaderError> {
        match self.raft.get_read_log_id().await {
            Ok((read, applied)) => {
                let r = read.map(|l| l.index).unwrap_or(0);
                let a = applied.map(|l| l.index).unwrap_or(0);
                Ok(r.max(a))
            }
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(LeaderError::NotLeader {
                    leader: f.leader_id,
                    leader_addr: f.leader_node.as_ref().map(|n| n.rpc_addr.clone()),
                })
            }
            Err(e) => Err(LeaderError::Unavailable(e.to_string())),
        }
    }

    /// Proposes `op` through the leader and returns its response.
    /// `Response::Err` comes back as `Ok(Response::Err(..))`; use [`Self::write_ok`]
    /// to turn it into an error.
    ///
    /// The write carries an [`Origin`] (this process, a serial), so it is retried —
    /// on the same or a new leader — whenever its outcome is unknown (timeout, lost
    /// connection, leader change), and the state machine applies it at most once.
    pub async fn write(&self, op: Op) -> Result<Response, NodeError> {
        let serial = self.serials.begin();
        let result = self.write_serial(op, serial).await;
        self.serials.end(serial);
        result
    }

    async fn write_serial(&self, op: Op, serial: u64) -> Result<Response, NodeError> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        // Set once an attempt may have reached a leader's log: from then on, giving up says
        // so, whatever the last attempt found (a later "no leader" does not undo an earlier
        // proposal, which a new leader may still commit).
        let mut maybe_applied: Option<String> = None;
        loop {
            let origin = self.serials.origin(self.cfg.node_id, serial);
            let leader = self.current_leader();
            let res = match leader {
                Some(l) if l == self.cfg.node_id => self.propose(op.clone(), Some(origin)).await,
                Some(l) => match self.peer_for(l).await {
                    Some(c) => {
                        let req = Request::Write {
                            op: op.clone(),
                            origin: Some(origin),
                        };
                        match c.call(req, FORWARD_TIMEOUT).await {
                            Ok(Reply::Write(r)) => r,
                            Ok(other) => Err(LeaderError::Unavailable(format!(
                                "unexpected reply {other:?}"
                            ))),
                            Err(e) => Err(LeaderError::Unavailable(e.to_string())),
                        }
                    }
                    None => Err(LeaderError::NotLeader {
                        leader: None,
                        leader_addr: None,
                    }),
                },
                None => Err(LeaderError::NotLeader {
                    leader: None,
                    leader_addr: None,
                }),
            };
            if let Err(LeaderError::Unavailable(e)) = &res {
                maybe_applied = Some(e.clone());
            }
            match res {
                Ok(r) => return Ok(r),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, serial, "metadata write retried");
                    self.wait_leader_change(leader).await
                }
                Err(LeaderError::NotLeader { .. }) => {
                    return Err(match maybe_applied {
                        Some(e) => NodeError::Indeterminate(e),
                        None => NodeError::NoLeader(WRITE_DEADLINE),
                    });
                }
                Err(LeaderError::Unavailable(e)) => return Err(NodeError::Indeterminate(e)),
            }
        }
    }

    /// Like [`Self::write`], with `Response::Err` turned into `NodeError::Meta`.
    pub async fn write_ok(&self, op: Op) -> Result<Response, NodeError> {
        Ok(self.write(op).await?.into_result()?)
    }

    /// Proposes on this node, which believes it is the leader.
    async fn propose(&self, op: Op, origin: Option<Origin>) -> Result<Response, LeaderError> {
        let cmd = Command {
            now_ms: self.cfg.clock.now_ms(),
            op,
            origin,
        };
        // A node restarted with a committed vote of its own resumes as leader of its old
        // term and steps down at the first answer from a peer; openraft 0.9 may then never
        // answer a proposal made in between (its responder is lost with the old term's log
        // tail). Such a proposal is given up once the leadership is gone, and retried by the
        // caller: retries carry the same origin and are applied at most once.
        let mut metrics = self.raft.metrics();
        let term = metrics.borrow().current_term;
        let lost = async move {
            let _ = metrics
                .wait_for(|m| m.current_term != term || m.state != ServerState::Leader)
                .await;
            tokio::time::sleep(LOST_LEADERSHIP_GRACE).await;
        };
        let write = tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.client_write(cmd));
        let written = tokio::select! {
            biased;
            w = write => w,
            _ = lost => {
                return Err(LeaderError::Unavailable(
                    "this node lost the leadership before the proposal committed".into(),
                ));
            }
        };
        let written = match written {
            Ok(w) => w,
            Err(_) => {
                let m = self.raft.metrics().borrow().clone();
                tracing::warn!(
                    term = m.current_term,
                    leader = ?m.current_leader,
                    state = ?m.state,
                    last_log = ?m.last_log_index,
                    applied = ?m.last_applied.map(|l| l.index),
                    "a proposal was not committed in time"
                );
                return Err(LeaderError::Unavailable(format!(
                    "proposal not committed within {PROPOSE_TIMEOUT:?}"
                )));
            }
        };
        match written {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(LeaderError::NotLeader {
                    leader: f.leader_id,
                    leader_addr: f.leader_node.map(|n| n.rpc_addr),
                })
            }
            Err(e) => Err(LeaderError::Unavailable(e.to_string())),
        }
    }

    fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Waits (bounded) until the known leader differs from `old` or a short time passed.
    async fn wait_leader_change(&self, old: Option<NodeId>) {
        let mut rx = self.raft.metrics();
        let _ = tokio::time::timeout(
            Duration::from_millis(self.cfg.election_timeout_max_ms),
            rx.wait_for(|m| m.current_leader != old && m.current_leader.is_some()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    async fn peer_for(&self, id: NodeId) -> Option<Arc<RpcClient>> {
        let addr = {
            let m = self.raft.metrics().borrow().clone();
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.rpc_addr.clone())
        }?;
        Some(self.client(&addr).await)
    }

    async fn client(&self, addr: &str) -> Arc<RpcClient> {
        let mut peers = self.peers.lock().await;
        peers
            .entry(addr.to_string())
            .or_insert_with(|| {
                Arc::new(RpcClient::new(addr, self.cfg.key.clone(), self.cfg.node_id))
            })
            .clone()
    }

    // ---- joining ---------------------------------------------------------------------

    async fn join_or_bootstrap(&self) -> Result<(), NodeError> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        if initialized {
            return Ok(());
        }
        if self.cfg.bootstrap {
            let members = BTreeMap::from([(
                self.cfg.node_id,
                RaftNode {
                    rpc_addr: self.cfg.rpc_advertise.clone(),
                },
            )]);
            match self.raft.initialize(members).await {
                Ok(()) => return Ok(()),
                Err(RaftError::APIError(e)) => {
                    tracing::info!(error = %e, "cluster already initialised");
                    return Ok(());
                }
                Err(e) => return Err(NodeError::Raft(e.to_string())),
            }
        }
        if self.cfg.seeds.is_empty() {
            return Err(NodeError::Config(
                "no Raft state, not bootstrapping, and no peers to join".into(),
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut targets: Vec<String> = self.cfg.seeds.clone();
        while Instant::now() < deadline {
            let mut next = Vec::new();
            for addr in &targets {
                let client = self.client(addr).await;
                let req = Request::Join {
                    node: self.cfg.node_id,
                    rpc_addr: self.cfg.rpc_advertise.clone(),
                };
                match client.call(req, Duration::from_secs(10)).await {
                    Ok(Reply::Join(Ok(()))) => return Ok(()),
                    Ok(Reply::Join(Err(LeaderError::NotLeader {
                        leader_addr: Some(a),
                        ..
                    }))) => next.push(a),
                    Ok(other) => tracing::debug!(seed = %addr, ?other, "join not accepted yet"),
                    Err(e) => tracing::debug!(seed = %addr, error = %e, "join attempt failed"),
                }
            }
            next.extend(self.cfg.seeds.iter().cloned());
            next.dedup();
            targets = next;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(NodeError::Join(self.cfg.seeds.clone()))
    }

    /// Waits until this node sees itself in the membership and a leader.
    async fn wait_member(&self) -> Result<(), NodeError> {
        let me = self.cfg.node_id;
        let mut rx = self.raft.metrics();
        let wait = rx.wait_for(|m| {
            m.current_leader.is_some() && m.membership_config.membership().get_node(&me).is_some()
        });
        match tokio::time::timeout(Duration::from_secs(60), wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(NodeError::NoLeader(Duration::from_secs(60))),
        }
    }

    // ---- session ------------------------------------------------------------------------

    async fn open_session(&self) -> Result<SessionId, NodeError> {
        self.wait_out_previous_session().await;
        let sent = Instant::now();
        let r = self
            .write_ok(Op::OpenSession {
                node: self.cfg.node_id,
                ttl_ms: self.cfg.session_ttl_ms,
            })
            .await?;
        let Response::Session(id) = r else {
            return Err(NodeError::Raft(format!("OpenSession answered {r:?}")));
        };
        self.session_tx.send_replace(SessionState::Live {
            id,
            valid_until: sent + self.lease_len(),
        });
        tracing::info!(session = id, "metadata session opened");
        Ok(id)
    }

    /// Waits until no session of this node is live in the cluster (a linearizable read).
    ///
    /// After a crash, or a lease that lapsed, this node's previous session may still be live,
    /// with its locks. Opening a new session would end it at once and let other nodes take those
    /// locks, while writes issued under it may still be queued at the SAN target: they are
    /// bound to land within the session TTL, not within a restart. So the old session is left to
    /// expire on its own, as it would if this node had not come back (at most one TTL after its
    /// last renewal). Bounded by [`PREVIOUS_SESSION_WAIT`] TTLs (leader changes extend sessions);
    /// past that the session is replaced, with a warning. A read that fails (a leader change)
    /// is retried within the same bound.
    async fn wait_out_previous_session(&self) {
        let me = self.cfg.node_id;
        let ttl = Duration::from_millis(self.cfg.session_ttl_ms);
        let deadline = Instant::now() + ttl * PREVIOUS_SESSION_WAIT;
        let mut told = false;
        loop {
            let live = match self.read(|s| s.node(me).and_then(|n| n.session)).await {
                Ok(None) => return,
                Ok(live) => live,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read this node's previous session yet");
                    None
                }
            };
            if Instant::now() >= deadline {
                tracing::warn!(
                    session = ?live,
                    "the previous session was not seen to expire in time; opening a new one"
                );
                return;
            }
            if let Some(old) = live
                && !told
            {
                tracing::info!(
                    session = old,
                    "waiting for this node's previous session to expire before opening a new one"
                );
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn lease_len(&self) -> Duration {
        Duration::from_millis(self.cfg.session_ttl_ms - self.cfg.fence_margin_ms())
    }

    /// The current session state (watch it to learn of a lost session).
    pub fn session(&self) -> watch::Receiver<SessionState> {
        self.session_tx.subscribe()
    }

    /// The session this process holds or last held, lease valid or not (`None` before the
    /// first one opened).
    pub fn session_id(&self) -> Option<SessionId> {
        match *self.session_tx.borrow() {
            SessionState::Live { id, .. } | SessionState::Lost { previous: id } => Some(id),
            SessionState::Opening => None,
        }
    }

    /// The live session id, if the lease is currently valid.
    pub fn live_session(&self) -> Option<SessionId> {
        match *self.session_tx.borrow() {
            SessionState::Live { id, valid_until } if Instant::now() < valid_until => Some(id),
            _ => None,
        }
    }

    /// True while this node may issue LUN writes under its locks.
    pub fn may_write(&self) -> bool {
        self.live_session().is_some()
    }

    async fn keepalive_loop(self: Arc<Self>) {
        let period = Duration::from_millis((self.cfg.session_ttl_ms / 4).max(50));
        loop {
            tokio::select! {
                _ = self.loops.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let current = self.session_tx.borrow().clone();
            match current {
                SessionState::Live { id, valid_until } => {
                    let sent = Instant::now();
                    match self.write(Op::KeepAlive { session: id }).await {
                        Ok(Response::Ok) => {
                            // Only extend if the lease did not lapse meanwhile.
                            self.session_tx.send_if_modified(|s| match s {
                                SessionState::Live {
                                    id: cur,
                                    valid_until: v,
                                } if *cur == id => {
                                    *v = (*v).max(sent + self.lease_len());
                                    true
                                }
                                _ => false,
                            });
                        }
                        Ok(Response::Err(MetaError::SessionExpired(_))) => {
                            tracing::warn!(session = id, "metadata session expired; locks lost");
                            self.session_tx
                                .send_replace(SessionState::Lost { previous: id });
                        }
                        Ok(other) => tracing::warn!(?other, "unexpected keep-alive answer"),
                        Err(e) => {
                            tracing::warn!(session = id, error = %e, "keep-alive failed");
                            if Instant::now() >= valid_until {
                                tracing::warn!(session = id, "lease lapsed: self-fenced");
                                self.session_tx
                                    .send_replace(SessionState::Lost { previous: id });
                            }
                        }
                    }
                }
                SessionState::Opening | SessionState::Lost { .. } => {
                    if let Err(e) = self.open_session().await {
                        tracing::warn!(error = %e, "cannot reopen the metadata session");
                    }
                }
            }
        }
    }

    // ---- leader duties -------------------------------------------------------------------

    async fn leader_loop(self: Arc<Self>) {
        let tick = Duration::from_millis(250);
        let mut led_term: Option<u64> = None;
        let mut last_reconcile = Instant::now();
        loop {
            tokio::select! {
                _ = self.loops.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let m = self.raft.metrics().borrow().clone();
            if m.state != ServerState::Leader {
                led_term = None;
                continue;
            }
            if led_term != Some(m.current_term) {
                // A new leader waits one TTL before expiring anyone.
                match self.propose(Op::ExtendSessions, None).await {
                    Ok(_) => led_term = Some(m.current_term),
                    Err(e) => {
                        tracing::debug!(error = %e, "ExtendSessions not committed");
                        continue;
                    }
                }
            }
            match self.propose(Op::Tick, None).await {
                Ok(Response::Expired(ids)) if !ids.is_empty() => {
                    tracing::warn!(sessions = ?ids, "expired metadata sessions");
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "tick not committed"),
            }
            if last_reconcile.elapsed() >= Duration::from_millis(500) {
                last_reconcile = Instant::now();
                if let Err(e) = self.reconcile_voters(None).await {
                    tracing::debug!(error = %e, "voter reconciliation deferred");
                }
            }
        }
    }

    /// Keeps the voter set at the desired size with live, caught-up nodes.
    /// `leaving` is a node that is about to stop and should lose its seat now.
    async fn reconcile_voters(&self, leaving: Option<NodeId>) -> Result<(), NodeError> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Ok(());
        }
        let membership = m.membership_config.membership().clone();
        if membership.get_joint_config().len() > 1 {
            return Ok(()); // a change is in progress
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let all = voters.len() + learners.len();
        let desired = MetaConfig::desired_voters(all);
        let now = self.cfg.clock.now_ms();
        let last_log = m.last_log_index.unwrap_or(0);
        let (alive, long_dead) = self.read_local(|s| {
            let mut alive = BTreeSet::new();
            let mut long_dead = BTreeSet::new();
            for id in voters.iter().chain(learners.iter()) {
                let rec = s.node(*id);
                let live = rec
                    .and_then(|r| r.session)
                    .and_then(|sid| s.session(sid))
                    .is_some();
                if live && Some(*id) != leaving {
                    alive.insert(*id);
                } else {
                    let since = rec.map(|r| r.last_heartbeat_ms).unwrap_or(0);
                    if Some(*id) == leaving
                        || now.saturating_sub(since) > self.cfg.voter_replace_after_ms
                    {
                        long_dead.insert(*id);
                    }
                }
            }
            (alive, long_dead)
        });
        let caught_up = |id: &NodeId| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(id).cloned().flatten())
                .map(|l| l.index + 100 >= last_log)
                .unwrap_or(false)
        };
        let mut candidates: Vec<NodeId> = learners
            .iter()
            .filter(|id| alive.contains(id) && caught_up(id))
            .copied()
            .collect();
        let mut target: BTreeSet<NodeId> = voters.clone();
        // Replace dead voters with candidates, one for one.
        for dead in voters.iter().filter(|v| long_dead.contains(v)) {
            if *dead == self.cfg.node_id && leaving != Some(*dead) {
                continue;
            }
            if let Some(c) = candidates.pop() {
                target.remove(dead);
                target.insert(c);
            }
        }
        while target.len() < desired {
            match candidates.pop() {
                Some(c) => {
                    target.insert(c);
                }
                None => break,
            }
        }
        if target != voters && !target.is_empty() {
            tracing::info!(from = ?voters, to = ?target, "changing voters");
            self.raft
                .change_membership(ChangeMembers::ReplaceAllVoters(target), true)
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
        }
        Ok(())
    }

    // ---- RPC handling ----------------------------------------------------------------------

    async fn handle(self: Arc<Self>, _peer: NodeId, req: Request) -> Reply {
        match req {
            Request::AppendEntries(r) => Reply::AppendEntries(self.raft.append_entries(r).await),
            Request::Vote(r) => Reply::Vote(self.raft.vote(r).await),
            Request::InstallSnapshot(r) => {
                Reply::InstallSnapshot(self.raft.install_snapshot(r).await)
            }
            Request::Write { op, origin } => Reply::Write(self.propose(op, origin).await),
            Request::ReadIndex => Reply::ReadIndex(self.local_read_index().await),
            Request::Join { node, rpc_addr } => Reply::Join(self.handle_join(node, rpc_addr).await),
            Request::Leave { node } => Reply::Leave(
                self.reconcile_voters(Some(node))
                    .await
                    .map_err(|e| LeaderError::Unavailable(e.to_string())),
            ),
            Request::Status => Reply::Status(self.status()),
            Request::Shutdown => {
                self.stop_requested.cancel();
                Reply::Shutdown
            }
            Request::LockAcquire { key, exclusive } => {
                let mode = if exclusive {
                    LockMode::Exclusive
                } else {
                    LockMode::Shared
                };
                Reply::Lock(self.acquire(&key, mode).await.map_err(|e| e.to_string()))
            }
            Request::LockRelease { key } => Reply::Lock(
                self.release(&key)
                    .await
                    .map(|_| 0)
                    .map_err(|e| e.to_string()),
            ),
            Request::LockValidate { key, token } => Reply::Lock(
                self.validate(&key, token)
                    .await
                    .map(|_| token)
                    .map_err(|e| e.to_string()),
            ),
            Request::Submit(op) => Reply::Write(
                self.write(op)
                    .await
                    .map_err(|e| LeaderError::Unavailable(e.to_string())),
            ),
            Request::Ext { service, payload } => {
                let handler = self
                    .ext
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&service)
                    .cloned();
                Reply::Ext(match handler {
                    Some(h) => h(_peer, payload).await,
                    None => Err(format!("no service {service} on node {}", self.cfg.node_id)),
                })
            }
            Request::Query(q) => Reply::Query(
                self.query(q)
                    .await
                    .map_err(|e| LeaderError::Unavailable(e.to_string())),
            ),
            Request::StateDigest => Reply::StateDigest(self.state_digest()),
        }
    }

    /// This replica's applied index and the blake3 digest of its postcard-encoded state,
    /// taken together: retaken while an apply moved the index during the encoding.
    pub fn state_digest(&self) -> Result<StateDigest, String> {
        let index =
            |rx: &watch::Receiver<Option<LogId<NodeId>>>| rx.borrow().map(|l| l.index).unwrap_or(0);
        for _ in 0..32 {
            let before = index(&self.applied);
            let bytes = self
                .read_local(postcard::to_allocvec)
                .map_err(|e| format!("cannot encode the state: {e}"))?;
            if index(&self.applied) == before {
                return Ok(StateDigest {
                    node: self.cfg.node_id,
                    applied: before,
                    digest: *blake3::hash(&bytes).as_bytes(),
                });
            }
        }
        Err("the state kept changing while it was encoded".into())
    }

    async fn handle_join(&self, node: NodeId, rpc_addr: String) -> Result<(), LeaderError> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            let leader_addr = m.current_leader.and_then(|l| {
                m.membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.rpc_addr.clone())
            });
            return Err(LeaderError::NotLeader {
                leader: m.current_leader,
                leader_addr,
            });
        }
        if let Some(existing) = m.membership_config.membership().get_node(&node)
            && existing.rpc_addr == rpc_addr
        {
            return Ok(());
        }
        self.raft
            .add_learner(node, RaftNode { rpc_addr }, false)
            .await
            .map(|_| ())
            .map_err(|e| LeaderError::Unavailable(e.to_string()))
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> NodeStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        // While a voter change is in progress (joint consensus), an election needs a majority
        // of every configuration in effect: only nodes in all of them are reported as voters,
        // the ones being added or removed as learners.
        let configs = membership.get_joint_config();
        let voters: Vec<NodeId> = membership
            .voter_ids()
            .filter(|id| configs.iter().all(|c| c.contains(id)))
            .collect();
        NodeStatus {
            id: self.cfg.node_id,
            leader: m.current_leader,
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index),
            learners: membership
                .nodes()
                .map(|(id, _)| *id)
                .filter(|id| !voters.contains(id))
                .collect(),
            voters,
            members: membership
                .nodes()
                .map(|(id, n)| (*id, n.rpc_addr.clone()))
                .collect(),
            session: self.live_session(),
            fenced: !self.may_write(),
        }
    }

    /// Serves a linearizable metadata query.
    pub async fn query(&self, q: Query) -> Result<QueryReply, NodeError> {
        let index = self.read_index().await?;
        self.wait_applied(index).await?;
        Ok(self.read_local(|s| match q {
            Query::Volume => QueryReply::Volume(s.volume().cloned()),
            Query::Nodes => QueryReply::Nodes(s.nodes()),
            Query::Locks => QueryReply::Locks(s.locks()),
            Query::Sessions => QueryReply::Sessions(s.sessions().cloned().collect()),
            Query::Space => QueryReply::Space(s.space()),
            Query::Fsck => QueryReply::Fsck {
                applied: index,
                violations: s.check_invariants().err().unwrap_or_default(),
            },
        }))
    }

    // ---- locks for this node's session -------------------------------------------------

    /// Acquires `key` for this node's session.
    pub async fn acquire(&self, key: &str, mode: LockMode) -> Result<FencingToken, NodeError> {
        let session = self.live_session().ok_or(NodeError::NoSession)?;
        match self
            .write_ok(Op::Acquire {
                session,
                key: key.to_string(),
                mode,
            })
            .await?
        {
            Response::Lock(t) => Ok(t),
            other => Err(NodeError::Raft(format!("Acquire answered {other:?}"))),
        }
    }

    /// Releases `key` held by this node's session.
    pub async fn release(&self, key: &str) -> Result<(), NodeError> {
        let session = self.live_session().ok_or(NodeError::NoSession)?;
        self.write_ok(Op::Release {
            session,
            key: key.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// Checks that this node's live session still holds `key` with exactly `token`
    /// (linearizable). A node that lost its session or its lock learns it here.
    pub async fn validate(&self, key: &str, token: FencingToken) -> Result<(), NodeError> {
        let session = self.live_session().ok_or(NodeError::NoSession)?;
        let info = self.read(|s| s.lock(key)).await?;
        let current = info
            .as_ref()
            .and_then(|l| l.holders.iter().map(|h| h.token).max())
            .unwrap_or(0);
        let ours = info
            .map(|l| {
                l.holders
                    .iter()
                    .any(|h| h.session == session && h.token == token)
            })
            .unwrap_or(false);
        if ours {
            Ok(())
        } else {
            Err(NodeError::Meta(MetaError::Fenced {
                given: token,
                current,
            }))
        }
    }

    /// Registers `handler` for `Request::Ext { service, .. }` on this node's RPC server.
    pub fn register_service(&self, service: u8, handler: ExtHandler) {
        self.ext
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service, handler);
    }

    /// Calls a registered service on another member over the authenticated RPC.
    pub async fn call_service(
        &self,
        node: NodeId,
        service: u8,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, NodeError> {
        let client = self
            .peer_for(node)
            .await
            .ok_or_else(|| NodeError::Config(format!("node {node} is not a member")))?;
        match client
            .call(Request::Ext { service, payload }, timeout)
            .await?
        {
            Reply::Ext(Ok(b)) => Ok(b),
            Reply::Ext(Err(e)) => Err(NodeError::Service(e)),
            other => Err(NodeError::Service(format!("unexpected reply {other:?}"))),
        }
    }

    /// Stops the node gracefully: closes its session (releasing its locks and
    /// reservations), hands its voter seat to a healthy learner, and stops Raft.
    pub async fn shutdown(&self) {
        let session = match *self.session_tx.borrow() {
            SessionState::Live { id, .. } => Some(id),
            _ => None,
        };
        self.stop_requested.cancel();
        self.loops.cancel();
        let graceful = async {
            if let Some(id) = session
                && let Err(e) = self.write(Op::CloseSession { session: id }).await
            {
                tracing::warn!(error = %e, "could not close the metadata session");
            }
            self.leave().await;
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful)
            .await
            .is_err()
        {
            tracing::warn!("graceful leave did not finish in {SHUTDOWN_GRACE:?}; stopping anyway");
        }
        self.cancel.cancel();
        for t in self.tasks.lock().await.drain(..) {
            t.abort();
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    async fn leave(&self) {
        let me = self.cfg.node_id;
        let m = self.raft.metrics().borrow().clone();
        let is_voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == me);
        let has_learner = m
            .membership_config
            .membership()
            .learner_ids()
            .next()
            .is_some();
        if !is_voter || !has_learner {
            return;
        }
        let res = if m.current_leader == Some(me) {
            self.reconcile_voters(Some(me))
                .await
                .map_err(|e| e.to_string())
        } else if let Some(leader) = m.current_leader {
            match self.peer_for(leader).await {
                Some(c) => match c.call(Request::Leave { node: me }, CALL_TIMEOUT).await {
                    Ok(Reply::Leave(r)) => r.map_err(|e| e.to_string()),
                    other => Err(format!("{other:?}")),
                },
                None => Err("leader unknown".into()),
            }
        } else {
            Err("no leader".into())
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "could not hand over the voter seat");
        }
    }

    /// Resolves when the node was asked to stop (by RPC `Shutdown` or [`Self::shutdown`]).
    pub async fn stopped(&self) {
        self.stop_requested.cancelled().await
    }
}
