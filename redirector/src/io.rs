//! [`RedirectingLun`]: the I/O loop that drives the path [`Policy`] and the [`GhostLedger`] with
//! real I/O, presented to the layers above as a plain [`Lun`].
//!
//! Every request is routed by the policy: on the node's own SAN path ([`SanPath`]), to a peer over
//! the LAN ([`PeerTransport`]), or queued while the node has neither. Each attempt runs in its own
//! task under a per-request timeout (`io_timeout_ms`), so many requests are in flight at once and a
//! timed-out attempt keeps running: its completion tells when it has *resolved*.
//!
//! Rules this loop keeps (the policy and the ledger keep theirs):
//! - every completed attempt becomes a policy event (`IoOk`, `IoFailed`, `IoTimedOut`,
//!   `PeerFailed`, `PeerTimedOut`); the commands are carried out in order under one lock;
//! - a write whose outcome is unknown (a timeout, a path error on the direct path, a peer
//!   connection lost after sending) is registered with the ledger **before** it is re-issued on
//!   the next route; the ghost is resolved when the attempt's task has finished and then the
//!   path has settled ([`SanPath::settled`]); a write whose answer from a peer was lost resolves
//!   when that peer's process settles it, or when that process is gone and `dead_peer_drain_ms`
//!   have passed (`peer_lost`, `docs/fencing.md` §4a), never on a timeout alone;
//!   the ledger's rewrites are sent like writes (without a fence) until acknowledged;
//! - a write is registered with the ledger from admission to its outcome (`write_started`,
//!   `flight_acked`, or abandoned when dropped) and acknowledged to the caller only after the
//!   ledger recorded it (and, if a rewrite of its bytes raced it, emitted a rewrite of it); a
//!   read takes its overlay when issued, so the caller never reads data older than what it
//!   wrote;
//! - queued requests wait for a route; when the policy fails queued I/O (paused past
//!   `pause_bound_ms`) they fail with [`LunError::PathUnreachable`] (EIO). Nothing else fails
//!   while the direct path or a peer works, except the request's own errors (out of range,
//!   misaligned, a stale fencing token refused by a peer);
//! - `discard` is dropped (the [`Lun`] contract makes it advisory): a discard with an unknown
//!   outcome could land after newer data and zero it, and the ledger only knows data writes;
//! - a flush goes to the current route; every path reaches the same array cache, so it covers
//!   writes acknowledged on any path. It does not wait for unresolved ghosts; `settle` does
//!   (the volume settles before a data lock moves to another node, see `docs/fencing.md`).
//!
//! [`PeerService`] is the other side: it executes requests from peers on this node's own SAN path
//! (never redirecting them again), verifies the payload crc32c and the fencing token, answers
//! `PathError` at once when this node's own path is known bad, and answers a request only once it
//! has resolved on this node's path, so an answer always resolves the requester's ghost. It keeps
//! each requester's requests in flight by id; a `Settle` from a requester fences off its earlier
//! requests (any that arrives later is refused without touching the LUN) and is answered once none
//! of them is in flight, with the sessions this process has held.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use csv_core::lun::{IoFence, Lun, LunError, LunFuture, check_aligned, check_range};
use csv_core::meta::{NodeId, PathStatus, SessionId};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::frame::{self, RequestBody, Response, Status};
use crate::ghost::{Admission, GhostCommand, GhostId, GhostLedger, PathId};
use crate::path::SanPath;
use crate::peer::{
    BoxFuture, EnvelopeError, FenceCheck, FenceVerdict, PeerTransport, TransportError,
    decode_envelope, encode_envelope,
};
use crate::policy::{Command, Event, Millis, Mode, OpId, Policy, PolicyConfig, PolicyError, Route};

/// The ledger's path id of the direct path (peers use their node id, which is never 0).
pub const DIRECT_PATH: PathId = 0;
/// Requests larger than this are split into concurrent pieces.
pub const MAX_CHUNK: usize = 4 << 20;
/// A redirected request's id is `epoch << EPOCH_SHIFT | counter`: the epoch is chosen at random
/// when the process starts, so a peer tells this process's requests from an earlier one's.
const EPOCH_SHIFT: u32 = 40;

fn epoch_of(id: u64) -> u64 {
    id >> EPOCH_SHIFT
}

/// The first request id of a process: a random 24-bit epoch, counter 1.
fn first_request_id() -> u64 {
    let epoch: u64 = rand::random_range(0..1 << 24);
    (epoch << EPOCH_SHIFT) | 1
}

/// Settings of a [`RedirectingLun`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectorConfig {
    pub policy: PolicyConfig,
    /// Memory for newest data over unresolved ghosts; writes over ghosts stall beyond it.
    pub ghost_budget_bytes: usize,
    /// Writes whose answer from a peer was lost, when the process that received them is gone
    /// (its session ended or changed): they count as resolved this long after the loss. The
    /// daemon sets the session TTL: a dead node's SAN writes must land within it anyway, or a
    /// lock takeover after its session expired would be unsafe (`docs/fencing.md` §4).
    pub dead_peer_drain_ms: u64,
}

impl Default for RedirectorConfig {
    fn default() -> Self {
        let policy = PolicyConfig::default();
        RedirectorConfig {
            dead_peer_drain_ms: 10_000,
            policy,
            ghost_budget_bytes: 256 << 20,
        }
    }
}

/// Counters of what the redirector did (for diagnostics and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RedirectStats {
    pub direct_attempts: u64,
    pub peer_attempts: u64,
    pub timeouts: u64,
    pub reissues: u64,
    pub ghosts_resolved: u64,
    pub rewrites: u64,
    pub failed_no_path: u64,
    pub served_for_peers: u64,
    pub refused_stale: u64,
    /// Writes whose answer from a peer was lost, resolved by the peer's settle...
    #[serde(default)]
    pub lost_settled: u64,
    /// ... and resolved because the peer's process was gone and the drain time had passed.
    #[serde(default)]
    pub lost_drained: u64,
    /// Settles this node answered for peers.
    #[serde(default)]
    pub settles_served: u64,
}

#[derive(Default)]
struct Counters {
    direct_attempts: AtomicU64,
    peer_attempts: AtomicU64,
    timeouts: AtomicU64,
    reissues: AtomicU64,
    ghosts_resolved: AtomicU64,
    rewrites: AtomicU64,
    failed_no_path: AtomicU64,
    served_for_peers: AtomicU64,
    refused_stale: AtomicU64,
    lost_settled: AtomicU64,
    lost_drained: AtomicU64,
    settles_served: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One request as it goes on a path.
#[derive(Debug, Clone)]
enum IoOp {
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
        fence: Option<IoFence>,
    },
    Zeroes {
        offset: u64,
        len: u64,
    },
    Flush,
}

impl IoOp {
    fn is_write(&self) -> bool {
        matches!(self, IoOp::Write { .. } | IoOp::Zeroes { .. })
    }
}

/// How one attempt on one route ended.
enum Outcome {
    Done(Bytes),
    /// The request's own error: report it to the caller.
    Refused(LunError),
    /// The route failed and the request has resolved (it cannot execute later): try again.
    Failed,
    /// The outcome is unknown; the future completes when the request has resolved.
    Unknown(BoxFuture<'static, ()>),
}

struct State {
    policy: Policy,
    ledger: GhostLedger,
    next_op: OpId,
    /// Redirected requests of ours not yet answered, per peer (the policy's load figure).
    inflight: BTreeMap<NodeId, u32>,
    peers: BTreeMap<NodeId, bool>,
    /// When a direct request last succeeded (the idle health probe skips busy paths).
    last_direct_ok: Millis,
    idle_probe_running: bool,
    /// When the timer task wakes up next on its own (it naps at most `MAX_NAP`); an event
    /// kicks it only when the policy's next deadline comes earlier.
    timer_until: Millis,
}

struct Inner {
    node: NodeId,
    direct: Arc<dyn SanPath>,
    transport: Arc<dyn PeerTransport>,
    cfg: RedirectorConfig,
    size: u64,
    align: u32,
    epoch: Instant,
    wall_at_epoch_ms: u64,
    st: Mutex<State>,
    /// Bumped whenever the route may have changed (queued requests re-check it).
    route_tx: watch::Sender<u64>,
    /// Bumped when the ledger freed memory (stalled writes ask again).
    admit_tx: watch::Sender<u64>,
    timer: Arc<Notify>,
    status_tx: watch::Sender<PathStatus>,
    next_req: AtomicU64,
    /// Peers' requests this node is serving, and the settles that fenced earlier ones off.
    served: Mutex<Served>,
    /// Bumped whenever a peer's request finishes here (settles wait on it).
    served_tx: watch::Sender<u64>,
    /// Per peer: our last settle it answered (its id, the sessions it named). One settle per
    /// peer is in flight at a time; a lost request below a settled id is covered by it.
    settled: Mutex<BTreeMap<NodeId, SettleSlot>>,
    counters: Counters,
}

/// The [`PeerService`]'s record of what it serves (see [`PeerService`]).
#[derive(Default)]
struct Served {
    /// Per requesting node: its requests in flight here, by id.
    inflight: BTreeMap<NodeId, std::collections::BTreeSet<u64>>,
    /// Per requesting node: its last settle's id. Its requests of that epoch with a lower id,
    /// and of the epoch before (the counter carried over), are refused from then on.
    floor: BTreeMap<NodeId, u64>,
    /// Sessions this process held while serving (newest last, at most [`MAX_HELD`]).
    held: Vec<SessionId>,
}

/// Sessions a settle answer lists.
const MAX_HELD: usize = 16;

/// The last settle a peer answered us: (its request id, the sessions the peer named).
type SettleSlot = Arc<tokio::sync::Mutex<Option<(u64, Vec<SessionId>)>>>;

impl Served {
    fn fenced_off(&self, from: NodeId, id: u64) -> bool {
        self.floor.get(&from).is_some_and(|&floor| {
            let (e, fe) = (epoch_of(id), epoch_of(floor));
            (e == fe && id < floor) || e.wrapping_add(1) == fe
        })
    }

    fn hold(&mut self, session: Option<SessionId>) {
        if let Some(s) = session
            && !self.held.contains(&s)
        {
            if self.held.len() == MAX_HELD {
                self.held.remove(0);
            }
            self.held.push(s);
        }
    }
}

/// A [`Lun`] that sends I/O on the node's SAN path, or redirects it to a peer when the path fails.
/// Cheap to clone; clones share everything. See the module docs.
#[derive(Clone)]
pub struct RedirectingLun {
    inner: Arc<Inner>,
}

/// What went wrong building a [`RedirectingLun`].
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("invalid redirector configuration")]
    Config(#[source] PolicyError),
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn no_path(ms: u64) -> LunError {
    LunError::PathUnreachable {
        reason: format!("no SAN path and no healthy peer for {ms} ms (I/O paused past its bound)"),
    }
}

impl RedirectingLun {
    /// Wraps `direct` (this node's SAN path). `node` is this node's id, put in every redirected
    /// request. Must be called inside a tokio runtime (it starts the policy's timer task).
    pub fn new(
        node: NodeId,
        direct: Arc<dyn SanPath>,
        transport: Arc<dyn PeerTransport>,
        cfg: RedirectorConfig,
    ) -> Result<RedirectingLun, RedirectError> {
        let policy = Policy::new(cfg.policy.clone(), 0).map_err(RedirectError::Config)?;
        let ledger = GhostLedger::new(cfg.ghost_budget_bytes);
        let wall = wall_ms();
        let mut status = policy.status().clone();
        status.since_ms = wall;
        let inner = Arc::new(Inner {
            node,
            size: direct.size(),
            align: direct.alignment(),
            direct,
            transport,
            cfg,
            epoch: Instant::now(),
            wall_at_epoch_ms: wall,
            st: Mutex::new(State {
                policy,
                ledger,
                next_op: 1,
                inflight: BTreeMap::new(),
                peers: BTreeMap::new(),
                last_direct_ok: 0,
                idle_probe_running: false,
                timer_until: 0,
            }),
            route_tx: watch::channel(0).0,
            admit_tx: watch::channel(0).0,
            timer: Arc::new(Notify::new()),
            status_tx: watch::channel(status).0,
            next_req: AtomicU64::new(first_request_id()),
            served: Mutex::new(Served::default()),
            served_tx: watch::channel(0).0,
            settled: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
        });
        let timer = inner.timer.clone();
        let weak = Arc::downgrade(&inner);
        tokio::spawn(run_timer(weak, timer));
        Ok(RedirectingLun { inner })
    }

    /// The published path status (state, reason, since as Unix ms, peer); changes are pushed.
    pub fn status(&self) -> watch::Receiver<PathStatus> {
        self.inner.status_tx.subscribe()
    }

    /// The policy's current mode.
    pub fn mode(&self) -> Mode {
        self.inner.lock().policy.mode()
    }

    /// The peers and whether their own SAN path is healthy (from the cluster's node records).
    /// Peers missing from the list are forgotten; this node is ignored.
    pub fn update_peers(&self, peers: &[(NodeId, bool)]) {
        let inner = &self.inner;
        let mut st = inner.lock();
        let now = inner.now();
        let gone: Vec<NodeId> = st
            .peers
            .keys()
            .filter(|id| !peers.iter().any(|(p, _)| p == *id))
            .copied()
            .collect();
        let mut cmds = Vec::new();
        for peer in gone {
            st.peers.remove(&peer);
            cmds.extend(st.policy.handle(now, Event::PeerRemoved { peer }));
        }
        for &(peer, healthy) in peers {
            if peer == inner.node {
                continue;
            }
            st.peers.insert(peer, healthy);
            let load = st.inflight.get(&peer).copied().unwrap_or(0);
            cmds.extend(st.policy.handle(
                now,
                Event::PeerUpdate {
                    peer,
                    healthy,
                    load,
                },
            ));
        }
        inner.run_commands(cmds);
        inner.timer.notify_one();
    }

    /// The operator's maintenance request: redirect while a peer is usable (`true`), or not.
    pub fn set_user_redirect(&self, on: bool) {
        let ev = if on {
            Event::UserRedirect
        } else {
            Event::UserDirect
        };
        self.inner.event(ev);
    }

    /// Unresolved ghost writes and rewrites in flight.
    pub fn ghosts(&self) -> (usize, usize) {
        let st = self.inner.lock();
        (
            st.ledger.unresolved_ghosts(),
            st.ledger.rewrites_in_flight(),
        )
    }

    pub fn stats(&self) -> RedirectStats {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RedirectStats {
            direct_attempts: g(&c.direct_attempts),
            peer_attempts: g(&c.peer_attempts),
            timeouts: g(&c.timeouts),
            reissues: g(&c.reissues),
            ghosts_resolved: g(&c.ghosts_resolved),
            rewrites: g(&c.rewrites),
            failed_no_path: g(&c.failed_no_path),
            served_for_peers: g(&c.served_for_peers),
            refused_stale: g(&c.refused_stale),
            lost_settled: g(&c.lost_settled),
            lost_drained: g(&c.lost_drained),
            settles_served: g(&c.settles_served),
        }
    }

    /// The service that executes peers' redirected requests on this node's SAN path.
    pub fn peer_service(&self, fence: Arc<dyn FenceCheck>) -> PeerService {
        PeerService {
            inner: self.inner.clone(),
            fence,
        }
    }

    fn checked(&self, offset: u64, len: u64) -> Result<(), LunError> {
        check_range(offset, len, self.inner.size)?;
        check_aligned(offset, len, self.inner.align)
    }
}

/// Drives `Tick` at the policy's deadlines; ends when the LUN is dropped.
async fn run_timer(weak: Weak<Inner>, kick: Arc<Notify>) {
    const MAX_NAP: Duration = Duration::from_millis(250);
    loop {
        let until = {
            let Some(inner) = weak.upgrade() else { return };
            let mut st = inner.lock();
            let now = inner.now();
            let cmds = st.policy.handle(now, Event::Tick);
            inner.run_commands(cmds);
            inner.maybe_idle_probe(&mut st, now);
            let now = Instant::now();
            let cap = now + MAX_NAP;
            let until = st.policy.next_deadline().map_or(cap, |d| {
                inner.at(d).clamp(now + Duration::from_millis(1), cap)
            });
            st.timer_until = until.saturating_duration_since(inner.epoch).as_millis() as Millis;
            until
        };
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = kick.notified() => {}
        }
    }
}

impl Inner {
    fn served(&self) -> MutexGuard<'_, Served> {
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent; a poisoned lock is usable.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    fn at(&self, t: Millis) -> Instant {
        self.epoch + Duration::from_millis(t)
    }

    fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.policy.io_timeout_ms)
    }

    fn new_op(&self, st: &mut State) -> OpId {
        let op = st.next_op;
        st.next_op += 1;
        op
    }

    /// Feeds one event to the policy and carries out its commands.
    fn event(self: &Arc<Self>, ev: Event) {
        let mut st = self.lock();
        self.event_locked(&mut st, ev);
    }

    /// [`Inner::event`] for a caller that holds the state lock.
    fn event_locked(self: &Arc<Self>, st: &mut State, ev: Event) {
        let now = self.now();
        let cmds = st.policy.handle(now, ev);
        self.run_commands(cmds);
        // Kick the timer only when a deadline now comes before its wake-up: this runs for
        // every completed I/O, and waking a task per request costs more than the request.
        if st
            .policy
            .next_deadline()
            .is_some_and(|d| d < st.timer_until)
        {
            self.timer.notify_one();
        }
    }

    /// Carries out policy commands in order. `ResolveUnknown` needs nothing here: the attempt
    /// that reported the timeout registers its write with the ledger itself.
    fn run_commands(self: &Arc<Self>, cmds: Vec<Command>) {
        for c in cmds {
            match c {
                Command::UseDirect | Command::UsePeer(_) | Command::Pause | Command::FailQueued => {
                    tracing::info!(node = self.node, command = ?c, "path policy");
                    self.route_tx.send_modify(|v| *v += 1);
                }
                Command::StartProbe => self.spawn_probe(),
                Command::PublishStatus(mut s) => {
                    s.since_ms = self.wall_at_epoch_ms.saturating_add(s.since_ms);
                    tracing::info!(
                        node = self.node,
                        state = s.state.as_str(),
                        reason = s.reason.as_deref().unwrap_or("-"),
                        peer = ?s.peer,
                        "path state changed"
                    );
                    self.status_tx.send_replace(s);
                }
                Command::ResolveUnknown { .. } => {}
            }
        }
    }

    /// Carries out ledger commands (re-issues are done by the attempt that got them).
    fn run_ledger(self: &Arc<Self>, cmds: Vec<GhostCommand>) {
        for c in cmds {
            match c {
                GhostCommand::Reissue { .. } => {}
                GhostCommand::Rewrite { id, offset, data } => {
                    bump(&self.counters.rewrites);
                    let me = self.clone();
                    tokio::spawn(async move { me.rewrite(id, offset, data).await });
                }
                GhostCommand::RetryStalled => {
                    self.admit_tx.send_modify(|v| *v += 1);
                }
            }
        }
    }

    /// The periodic probe of a path in use that carried no successful I/O for a probe interval,
    /// so an idle node learns (and shows) that its path is gone.
    fn maybe_idle_probe(self: &Arc<Self>, st: &mut State, now: Millis) {
        let interval = self.cfg.policy.probe_interval_ms;
        if st.policy.mode() != Mode::Direct
            || st.idle_probe_running
            || now.saturating_sub(st.last_direct_ok) < interval
        {
            return;
        }
        st.idle_probe_running = true;
        st.last_direct_ok = now;
        let me = self.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(me.io_timeout(), me.direct.probe()).await;
            let ok = matches!(r, Ok(Ok(())));
            let still_direct = {
                let mut st = me.lock();
                st.idle_probe_running = false;
                if ok {
                    st.last_direct_ok = me.now();
                }
                st.policy.mode() == Mode::Direct
            };
            if !ok && still_direct {
                let (why, ev) = match r {
                    Ok(Err(e)) => (e.to_string(), Event::ProbeFailed),
                    // No answer: the path hangs (the probe's op id names no request).
                    _ => ("no answer".into(), Event::IoTimedOut { op: 0 }),
                };
                tracing::warn!(node = me.node, error = %why, "SAN path probe failed");
                me.event(ev);
            }
        });
    }

    fn spawn_probe(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(me.io_timeout(), me.direct.probe()).await;
            let ok = matches!(r, Ok(Ok(())));
            if let Ok(Err(e)) = &r {
                tracing::debug!(node = me.node, error = %e, "probe failed");
            }
            me.event(if ok {
                Event::ProbeOk
            } else {
                Event::ProbeFailed
            });
        });
    }

    /// Waits until the policy routes new I/O somewhere. Client requests fail when the policy
    /// fails queued I/O; internal ones (`patient`) keep waiting.
    async fn route(&self, patient: bool) -> Result<Route, LunError> {
        loop {
            let mut rx = self.route_tx.subscribe();
            let r = self.lock().policy.route();
            match r {
                Route::Direct | Route::Peer(_) => return Ok(r),
                Route::Fail if !patient => {
                    bump(&self.counters.failed_no_path);
                    return Err(no_path(self.cfg.policy.pause_bound_ms));
                }
                Route::Fail | Route::Queue => {
                    // The sender lives in `self`, so this cannot fail while we hold `self`.
                    let _ = rx.changed().await;
                }
            }
        }
    }

    async fn attempt(self: &Arc<Self>, route: Route, io: &IoOp) -> Outcome {
        match route {
            Route::Peer(p) => self.try_peer(p, io).await,
            _ => self.try_direct(io).await,
        }
    }

    async fn try_direct(self: &Arc<Self>, io: &IoOp) -> Outcome {
        bump(&self.counters.direct_attempts);
        let op = self.new_op(&mut self.lock());
        // Polled once here first: a page-cache hit completes without a task, a timer or a
        // thread wake-up. Only an I/O that has to wait becomes a task of its own, which a
        // timeout can leave running (its outcome is then unknown, see below).
        let mut io_fut = Box::pin(exec_direct(self.direct.clone(), io.clone()));
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(io_fut.as_mut().poll(cx))).await;
        let done = match first {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => {
                let mut task = tokio::spawn(io_fut);
                match tokio::time::timeout(self.io_timeout(), &mut task).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(join)) => {
                        tracing::error!(node = self.node, error = %join, "direct I/O task failed");
                        self.event(Event::IoFailed {
                            fault: crate::policy::PathFault::Io,
                        });
                        return Outcome::Failed;
                    }
                    Err(_) => {
                        bump(&self.counters.timeouts);
                        tracing::warn!(node = self.node, op = io_name(io), "direct I/O timed out");
                        self.event(Event::IoTimedOut { op });
                        let path = self.direct.clone();
                        return Outcome::Unknown(Box::pin(async move {
                            let _ = task.await;
                            let _ = path.settled().await;
                        }));
                    }
                }
            }
        };
        match done {
            Ok(b) => {
                let mut st = self.lock();
                st.last_direct_ok = self.now();
                self.event_locked(&mut st, Event::IoOk);
                drop(st);
                Outcome::Done(b)
            }
            Err(e) => match Event::from_lun_error(op, &e) {
                None => Outcome::Refused(e),
                Some(ev) => {
                    tracing::debug!(node = self.node, error = %e, "direct I/O failed");
                    self.event(ev);
                    if io.is_write() {
                        let path = self.direct.clone();
                        Outcome::Unknown(Box::pin(async move {
                            let _ = path.settled().await;
                        }))
                    } else {
                        Outcome::Failed
                    }
                }
            },
        }
    }

    async fn try_peer(self: &Arc<Self>, peer: NodeId, io: &IoOp) -> Outcome {
        bump(&self.counters.peer_attempts);
        // Who receives it, as far as this node knows: needed if the answer is lost.
        let incarnation = self.transport.incarnation(peer);
        let (op, id) = {
            let mut st = self.lock();
            *st.inflight.entry(peer).or_default() += 1;
            (
                self.new_op(&mut st),
                self.next_req.fetch_add(1, Ordering::Relaxed),
            )
        };
        let (body, offset, key, token, want) = match io {
            IoOp::Read { offset, len } => {
                (RequestBody::Read { len: *len as u32 }, *offset, "", 0, *len)
            }
            IoOp::Write {
                offset,
                data,
                fua,
                fence,
            } => (
                RequestBody::Write {
                    data: data.clone(),
                    fua: *fua,
                },
                *offset,
                fence.as_ref().map_or("", |f| f.key.as_str()),
                fence.as_ref().map_or(0, |f| f.token),
                0,
            ),
            IoOp::Zeroes { offset, len } => (
                RequestBody::WriteZeroes {
                    len: *len,
                    fua: false,
                },
                *offset,
                "",
                0,
                0,
            ),
            IoOp::Flush => (RequestBody::Flush, 0, "", 0, 0),
        };
        let req = frame::Request {
            id,
            offset,
            token,
            node: self.node,
            body,
        };
        let wire = match encode_envelope(key, &req) {
            Ok(w) => w,
            Err(e) => {
                self.peer_done(peer);
                return Outcome::Refused(LunError::Io {
                    op: io_name(io),
                    offset,
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                });
            }
        };
        let me = self.clone();
        let mut task: JoinHandle<Result<Bytes, TransportError>> = tokio::spawn(async move {
            let r = me.transport.call(peer, wire).await;
            me.peer_done(peer);
            r
        });
        let answer = match tokio::time::timeout(self.io_timeout(), &mut task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(TransportError::Lost {
                peer,
                reason: join.to_string(),
            }),
            Err(_) => {
                bump(&self.counters.timeouts);
                tracing::warn!(node = self.node, peer, "redirected I/O timed out");
                self.event(Event::PeerTimedOut { peer, op });
                if !io.is_write() {
                    return Outcome::Failed;
                }
                let me = self.clone();
                return Outcome::Unknown(Box::pin(async move {
                    // An answer of any kind means the request resolved on the peer's path.
                    if !matches!(
                        task.await,
                        Ok(Ok(_)) | Ok(Err(TransportError::NotSent { .. }))
                    ) {
                        me.peer_lost(peer, incarnation, id).await;
                    }
                }));
            }
        };
        let resp = match answer {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(node = self.node, error = %e, "redirected I/O failed");
                self.event(Event::PeerFailed { peer });
                return match e {
                    TransportError::Lost { .. } if io.is_write() => {
                        Outcome::Unknown(Box::pin(self.clone().peer_lost(peer, incarnation, id)))
                    }
                    _ => Outcome::Failed,
                };
            }
        };
        let mut buf = BytesMut::from(&resp[..]);
        let r = match Response::decode(&mut buf) {
            Ok(Some(r)) if r.id == id && buf.is_empty() => r,
            other => {
                tracing::warn!(node = self.node, peer, answer = ?other.map(|o| o.map(|r| (r.id, r.status))), "bad answer from peer");
                self.event(Event::PeerFailed { peer });
                return Outcome::Failed;
            }
        };
        match r.status {
            Status::Ok if want == 0 || r.payload.len() == want => Outcome::Done(r.payload),
            Status::StaleToken => Outcome::Refused(LunError::Fenced { token }),
            Status::OutOfRange => Outcome::Refused(LunError::OutOfRange {
                offset,
                len: want as u64,
                size: self.size,
            }),
            Status::Ok | Status::PathError | Status::CrcMismatch | Status::Busy => {
                tracing::debug!(node = self.node, peer, status = ?r.status, "peer refused redirected I/O");
                self.event(Event::PeerFailed { peer });
                Outcome::Failed
            }
        }
    }

    /// Completes when request `id`, sent to `peer` when its session was `incarnation`, whose
    /// answer was lost, has resolved (`docs/fencing.md` §4a):
    /// - the process holding that session answers a settle: it has finished every earlier
    ///   request of ours and refuses any that still arrives; or
    /// - that process is gone (the peer's session is another one, or none, or the settle is
    ///   answered by a process that never held it), and `dead_peer_drain_ms` have passed since
    ///   the loss.
    ///
    /// While neither holds it keeps asking, every `peer_retry_ms`: an unreachable peer that is
    /// alive may still execute the writes, so time alone never resolves them.
    async fn peer_lost(self: Arc<Self>, peer: NodeId, incarnation: Option<SessionId>, id: u64) {
        let drained_at = Instant::now() + Duration::from_millis(self.cfg.dead_peer_drain_ms);
        let retry = Duration::from_millis(self.cfg.policy.peer_retry_ms.max(10));
        let mut gone = false;
        loop {
            gone |= incarnation.is_none() || self.transport.incarnation(peer) != incarnation;
            if !gone && let Some(held) = self.settle_covering(peer, id).await {
                if incarnation.is_some_and(|s| held.contains(&s)) {
                    bump(&self.counters.lost_settled);
                    tracing::debug!(
                        node = self.node,
                        peer,
                        "lost redirected writes settled by the peer"
                    );
                    return;
                }
                gone = true;
            }
            if gone && Instant::now() >= drained_at {
                bump(&self.counters.lost_drained);
                tracing::debug!(
                    node = self.node,
                    peer,
                    "lost redirected writes resolved: the peer's process is gone and its drain time passed"
                );
                return;
            }
            let nap = if gone {
                drained_at.saturating_duration_since(Instant::now())
            } else {
                retry
            };
            tokio::time::sleep(nap.max(Duration::from_millis(1))).await;
        }
    }

    /// The sessions named by a settle of `peer` that covers request `id` (sent after it): the
    /// last one it answered if that does, or a new one. One settle per peer is in flight at a
    /// time, so many lost requests to one peer cost one settle, not one each. `None` when the
    /// peer did not answer in time.
    async fn settle_covering(&self, peer: NodeId, id: u64) -> Option<Vec<SessionId>> {
        let slot = self.settled_slot(peer);
        let mut last = slot.lock().await;
        if let Some((settled, held)) = last.as_ref()
            && *settled > id
        {
            return Some(held.clone());
        }
        let (settled, held) = self.settle_peer(peer).await?;
        *last = Some((settled, held.clone()));
        Some(held)
    }

    fn settled_slot(&self, peer: NodeId) -> SettleSlot {
        let mut m = self.settled.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(peer).or_default().clone()
    }

    /// Asks `peer` to settle our earlier requests; returns the settle's id and the sessions the
    /// peer's process has held, or `None` when it did not answer in time.
    async fn settle_peer(&self, peer: NodeId) -> Option<(u64, Vec<SessionId>)> {
        let id = self.next_req.fetch_add(1, Ordering::Relaxed);
        let req = frame::Request {
            id,
            offset: 0,
            token: 0,
            node: self.node,
            body: RequestBody::Settle,
        };
        let wire = encode_envelope("", &req).ok()?;
        let limit = self.io_timeout() * 4;
        let answer = tokio::time::timeout(limit, self.transport.call(peer, wire)).await;
        let Ok(Ok(resp)) = answer else {
            return None;
        };
        let mut buf = BytesMut::from(&resp[..]);
        match Response::decode(&mut buf) {
            Ok(Some(r)) if r.id == id && r.status == Status::Ok && buf.is_empty() => Some((
                id,
                r.payload
                    .chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            )),
            other => {
                tracing::warn!(node = self.node, peer, answer = ?other.map(|o| o.map(|r| (r.id, r.status))), "bad answer to a settle");
                None
            }
        }
    }

    fn peer_done(&self, peer: NodeId) {
        let mut st = self.lock();
        if let Some(n) = st.inflight.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
    }

    /// Registers a write with unknown outcome and arranges its resolution.
    fn ghost(
        self: &Arc<Self>,
        offset: u64,
        data: Bytes,
        via: PathId,
        resolved: BoxFuture<'static, ()>,
    ) {
        bump(&self.counters.reissues);
        let g: GhostId = {
            let mut st = self.lock();
            let (g, cmds) = st.ledger.write_unknown(offset, data, via);
            drop(st);
            self.run_ledger(cmds);
            g
        };
        let me = self.clone();
        tokio::spawn(async move {
            resolved.await;
            bump(&me.counters.ghosts_resolved);
            let cmds = me.lock().ledger.ghost_resolved(g);
            tracing::debug!(node = me.node, ghost = g, "ghost write resolved");
            me.run_ledger(cmds);
        });
    }

    async fn read(self: &Arc<Self>, offset: u64, len: usize) -> Result<Bytes, LunError> {
        loop {
            let route = self.route(false).await?;
            let overlay = self.lock().ledger.overlay(offset, len as u64);
            if overlay.covers(offset, len as u64) {
                let mut buf = vec![0u8; len];
                overlay.apply(offset, &mut buf);
                return Ok(Bytes::from(buf));
            }
            match self.attempt(route, &IoOp::Read { offset, len }).await {
                Outcome::Done(b) if overlay.is_empty() => return Ok(b),
                Outcome::Done(b) => {
                    let mut buf = b.to_vec();
                    overlay.apply(offset, &mut buf);
                    return Ok(Bytes::from(buf));
                }
                Outcome::Refused(e) => return Err(e),
                Outcome::Failed | Outcome::Unknown(_) => self.settle_retry(route).await,
            }
        }
    }

    async fn write(
        self: &Arc<Self>,
        offset: u64,
        data: Bytes,
        fua: bool,
        fence: Option<IoFence>,
    ) -> Result<(), LunError> {
        let len = data.len() as u64;
        let flight = loop {
            let mut rx = self.admit_tx.subscribe();
            {
                let mut st = self.lock();
                if st.ledger.admit(offset, len) == Admission::Go {
                    break st.ledger.write_started(offset, len);
                }
            }
            let _ = rx.changed().await;
        };
        // Ends the flight unacknowledged if this future returns early or is dropped.
        let mut flight = InFlight {
            io: self,
            id: Some(flight),
        };
        let io = IoOp::Write {
            offset,
            data: data.clone(),
            fua,
            fence,
        };
        loop {
            let route = self.route(false).await?;
            match self.attempt(route, &io).await {
                Outcome::Done(_) => {
                    if let Some(id) = flight.id.take() {
                        let cmds = self.lock().ledger.flight_acked(id, offset, &data);
                        self.run_ledger(cmds);
                    }
                    return Ok(());
                }
                Outcome::Refused(e) => return Err(e),
                Outcome::Failed => self.settle_retry(route).await,
                Outcome::Unknown(resolved) => {
                    self.ghost(offset, data.clone(), path_id(route), resolved);
                }
            }
        }
    }

    async fn flush(self: &Arc<Self>) -> Result<(), LunError> {
        loop {
            let route = self.route(false).await?;
            match self.attempt(route, &IoOp::Flush).await {
                Outcome::Done(_) => return Ok(()),
                Outcome::Refused(e) => return Err(e),
                Outcome::Failed | Outcome::Unknown(_) => self.settle_retry(route).await,
            }
        }
    }

    /// Before retrying after a failure: if the policy still routes to the same place, give the
    /// path a moment instead of spinning (the policy moves on after a few failures).
    async fn settle_retry(&self, route: Route) {
        if self.lock().policy.route() == route {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends a ledger rewrite until its outcome is known, and reports it.
    async fn rewrite(self: Arc<Self>, id: u64, offset: u64, data: Bytes) {
        let io = IoOp::Write {
            offset,
            data,
            fua: false,
            fence: None,
        };
        let Ok(route) = self.route(true).await else {
            return;
        };
        let cmds = match self.attempt(route, &io).await {
            Outcome::Done(_) => self.lock().ledger.rewrite_acked(id),
            Outcome::Refused(e) => {
                tracing::error!(node = self.node, error = %e, offset, "ghost rewrite refused; dropping it");
                self.lock().ledger.rewrite_acked(id)
            }
            Outcome::Failed => {
                self.settle_retry(route).await;
                self.lock().ledger.rewrite_failed(id)
            }
            Outcome::Unknown(resolved) => {
                let (g, cmds) = self.lock().ledger.rewrite_unknown(id, path_id(route));
                if let Some(g) = g {
                    let me = self.clone();
                    tokio::spawn(async move {
                        resolved.await;
                        bump(&me.counters.ghosts_resolved);
                        let cmds = me.lock().ledger.ghost_resolved(g);
                        me.run_ledger(cmds);
                    });
                }
                cmds
            }
        };
        self.run_ledger(cmds);
    }
}

fn path_id(route: Route) -> PathId {
    match route {
        Route::Peer(p) => p,
        _ => DIRECT_PATH,
    }
}

fn io_name(io: &IoOp) -> &'static str {
    match io {
        IoOp::Read { .. } => "read",
        IoOp::Write { .. } => "write",
        IoOp::Zeroes { .. } => "write_zeroes",
        IoOp::Flush => "flush",
    }
}

async fn exec_direct(path: Arc<dyn SanPath>, io: IoOp) -> Result<Bytes, LunError> {
    match io {
        IoOp::Read { offset, len } => path.read_at(offset, len).await,
        IoOp::Write {
            offset, data, fua, ..
        } => path.write_at(offset, data, fua).await.map(|_| Bytes::new()),
        IoOp::Zeroes { offset, len } => path.write_zeroes(offset, len).await.map(|_| Bytes::new()),
        IoOp::Flush => path.flush().await.map(|_| Bytes::new()),
    }
}

/// Splits `[offset, offset+len)` into pieces of at most [`MAX_CHUNK`].
fn chunks(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize)> {
    (0..len.div_ceil(MAX_CHUNK)).map(move |i| {
        let start = i * MAX_CHUNK;
        (offset + start as u64, (len - start).min(MAX_CHUNK))
    })
}

impl Lun for RedirectingLun {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn alignment(&self) -> u32 {
        self.inner.align
    }

    fn describe(&self) -> String {
        format!("redirecting({})", self.inner.direct.describe())
    }

    fn read_at(&self, offset: u64, len: usize) -> LunFuture<'_, Bytes> {
        Box::pin(async move {
            self.checked(offset, len as u64)?;
            if len <= MAX_CHUNK {
                return if len == 0 {
                    Ok(Bytes::new())
                } else {
                    self.inner.read(offset, len).await
                };
            }
            let parts = futures::future::try_join_all(
                chunks(offset, len).map(|(o, l)| self.inner.read(o, l)),
            )
            .await?;
            let mut out = BytesMut::with_capacity(len);
            for p in parts {
                out.extend_from_slice(&p);
            }
            Ok(out.freeze())
        })
    }

    /// Only while I/O goes direct and no ghost write overlaps the range (those are served
    /// from memory by [`Lun::read_at`]); otherwise `None` and the caller reads normally.
    fn read_cached(
        &self,
        offset: u64,
        len: usize,
        how: csv_core::lun::ZeroCopy,
    ) -> Option<csv_core::lun::Cached> {
        self.checked(offset, len as u64).ok()?;
        {
            let st = self.inner.lock();
            if st.policy.route() != Route::Direct
                || !st.ledger.overlay(offset, len as u64).is_empty()
            {
                return None;
            }
        }
        self.inner.direct.read_cached(offset, len, how)
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> LunFuture<'_, ()> {
        self.write_fenced(offset, data, fua, None)
    }

    fn write_fenced(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        fence: Option<IoFence>,
    ) -> LunFuture<'_, ()> {
        Box::pin(async move {
            self.checked(offset, data.len() as u64)?;
            if data.is_empty() {
                return if fua { self.flush().await } else { Ok(()) };
            }
            futures::future::try_join_all(chunks(offset, data.len()).map(|(o, l)| {
                let start = (o - offset) as usize;
                self.inner
                    .write(o, data.slice(start..start + l), fua, fence.clone())
            }))
            .await
            .map(|_| ())
        })
    }

    fn flush(&self) -> LunFuture<'_, ()> {
        Box::pin(self.inner.flush())
    }

    /// Waits until no ghost write is unresolved and no rewrite is in flight, then flushes:
    /// once it returns, no write of this node can land late over another node's newer data.
    /// Bounded by `pause_bound_ms`: past it, fails with `Timeout`, and the caller keeps its
    /// lock (a stall, never a rollback).
    fn settle(&self) -> LunFuture<'_, ()> {
        Box::pin(async move {
            let bound = Duration::from_millis(self.inner.cfg.policy.pause_bound_ms);
            let deadline = tokio::time::Instant::now() + bound;
            loop {
                let (ghosts, rewrites) = self.ghosts();
                if ghosts == 0 && rewrites == 0 {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(LunError::Timeout {
                        op: "settle (unresolved ghost writes)",
                        ms: bound.as_millis() as u64,
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.inner.flush().await
        })
    }

    /// Dropped: see the module docs.
    fn discard(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        Box::pin(async move { check_range(offset, len, self.inner.size) })
    }
}

/// Executes peers' redirected requests on this node's SAN path (see the module docs).
#[derive(Clone)]
pub struct PeerService {
    inner: Arc<Inner>,
    fence: Arc<dyn FenceCheck>,
}

impl PeerService {
    /// Serves one envelope from node `from` (as authenticated by the transport). Returns the
    /// encoded [`Response`], or an error text when the request cannot even be answered (malformed
    /// envelope, wrong sender).
    pub async fn handle(&self, from: NodeId, envelope: &[u8]) -> Result<Bytes, String> {
        let (key, req) = match decode_envelope(envelope) {
            Ok(x) => x,
            Err(EnvelopeError::Frame(frame::FrameError::PayloadCrc { request_id, .. })) => {
                return encode_response(request_id, Status::CrcMismatch, Bytes::new());
            }
            Err(e) => return Err(format!("bad redirected request from node {from}: {e}")),
        };
        if req.node != from {
            return Err(format!(
                "redirected request names node {} but came from node {from}",
                req.node
            ));
        }
        if req.body == RequestBody::Settle {
            return self.settle(from, req.id).await;
        }
        let Some(admitted) = Admitted::new(&self.inner, from, req.id) else {
            tracing::debug!(
                node = self.inner.node,
                from,
                id = req.id,
                "refused a redirected request its sender has settled"
            );
            return encode_response(req.id, Status::PathError, Bytes::new());
        };
        let status = self.serve(&key, &req).await;
        drop(admitted);
        let (status, payload) = match status {
            Ok(b) => (Status::Ok, b),
            Err(s) => (s, Bytes::new()),
        };
        encode_response(req.id, status, payload)
    }

    /// Fences off `from`'s requests older than `id` (same epoch, or the epoch before), waits
    /// until none of them is in flight here, and answers the sessions this process has held.
    async fn settle(&self, from: NodeId, id: u64) -> Result<Bytes, String> {
        let inner = &self.inner;
        bump(&inner.counters.settles_served);
        let mut rx = inner.served_tx.subscribe();
        {
            let mut sv = inner.served();
            let floor = sv.floor.entry(from).or_insert(id);
            if epoch_of(*floor) != epoch_of(id) || *floor < id {
                *floor = id;
            }
        }
        loop {
            let pending = {
                let sv = inner.served();
                sv.inflight
                    .get(&from)
                    .is_some_and(|ids| ids.iter().any(|&r| sv.fenced_off(from, r)))
            };
            if !pending || rx.changed().await.is_err() {
                break;
            }
        }
        let held = {
            let mut sv = inner.served();
            sv.hold(inner.transport.incarnation(inner.node));
            sv.held.clone()
        };
        let payload: Vec<u8> = held.iter().flat_map(|s| s.to_be_bytes()).collect();
        tracing::debug!(
            node = inner.node,
            from,
            ?held,
            "settled a peer's earlier requests"
        );
        encode_response(id, Status::Ok, Bytes::from(payload))
    }

    async fn serve(&self, key: &str, req: &frame::Request) -> Result<Bytes, Status> {
        let inner = &self.inner;
        let path_bad = match inner.lock().policy.mode() {
            Mode::Direct => false,
            Mode::Redirected { reason, .. } => reason != crate::policy::Reason::UserRequest,
            Mode::Paused { .. } => true,
        };
        if path_bad {
            return Err(Status::PathError);
        }
        let io = match &req.body {
            RequestBody::Read { len } => IoOp::Read {
                offset: req.offset,
                len: *len as usize,
            },
            RequestBody::Write { data, fua } => IoOp::Write {
                offset: req.offset,
                data: data.clone(),
                fua: *fua,
                fence: None,
            },
            RequestBody::WriteZeroes { len, .. } => IoOp::Zeroes {
                offset: req.offset,
                len: *len,
            },
            RequestBody::Flush => IoOp::Flush,
            RequestBody::Settle => return Err(Status::PathError),
            RequestBody::Discard { len } => {
                return check_range(req.offset, *len, inner.size)
                    .map(|_| Bytes::new())
                    .map_err(|_| Status::OutOfRange);
            }
        };
        let len = match &io {
            IoOp::Read { len, .. } => *len as u64,
            IoOp::Write { data, .. } => data.len() as u64,
            IoOp::Zeroes { len, .. } => *len,
            IoOp::Flush => 0,
        };
        if check_range(req.offset, len, inner.size).is_err() {
            return Err(Status::OutOfRange);
        }
        if io.is_write() && req.token != 0 {
            let verdict = if key.is_empty() {
                FenceVerdict::Stale { current: 0 }
            } else {
                self.fence.check(key, req.token).await
            };
            if let FenceVerdict::Stale { current } = verdict {
                bump(&inner.counters.refused_stale);
                tracing::warn!(
                    node = inner.node,
                    from = req.node,
                    key,
                    token = req.token,
                    current,
                    "refused redirected write with a stale fencing token"
                );
                return Err(Status::StaleToken);
            }
        }
        if io.is_write() && !self.fence.may_write() {
            // Our lease lapsed: we issue no write, ours or a peer's (`docs/fencing.md` §1).
            tracing::warn!(
                node = inner.node,
                from = req.node,
                "refused a redirected write: this node's lease is not valid"
            );
            return Err(Status::PathError);
        }
        bump(&inner.counters.served_for_peers);
        let op = inner.new_op(&mut inner.lock());
        let mut task = tokio::spawn(exec_direct(inner.direct.clone(), io));
        let result = match tokio::time::timeout(inner.io_timeout(), &mut task).await {
            Ok(r) => r,
            Err(_) => {
                // Our own path hung: say so to our policy, but answer only once the request
                // has resolved here, so the answer resolves the requester's ghost.
                inner.event(Event::IoTimedOut { op });
                let r = task.await;
                let _ = inner.direct.settled().await;
                return match r {
                    Ok(Ok(b)) => Ok(b),
                    _ => Err(Status::PathError),
                };
            }
        };
        match result {
            Ok(Ok(b)) => {
                inner.event(Event::IoOk);
                Ok(b)
            }
            Ok(Err(e)) => {
                if let Some(ev) = Event::from_lun_error(op, &e) {
                    inner.event(ev);
                    let _ = inner.direct.settled().await;
                }
                Err(match e {
                    LunError::OutOfRange { .. } => Status::OutOfRange,
                    _ => Status::PathError,
                })
            }
            Err(_) => Err(Status::PathError),
        }
    }
}

/// A peer's request admitted by the [`PeerService`]: in flight until dropped.
struct Admitted<'a> {
    inner: &'a Inner,
    from: NodeId,
    id: u64,
}

impl<'a> Admitted<'a> {
    /// `None` when a settle of the sender has fenced the request off.
    fn new(inner: &'a Inner, from: NodeId, id: u64) -> Option<Admitted<'a>> {
        let session = inner.transport.incarnation(inner.node);
        let mut sv = inner.served();
        if sv.fenced_off(from, id) {
            return None;
        }
        sv.hold(session);
        sv.inflight.entry(from).or_default().insert(id);
        Some(Admitted { inner, from, id })
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        {
            let mut sv = self.inner.served();
            if let Some(ids) = sv.inflight.get_mut(&self.from) {
                ids.remove(&self.id);
                if ids.is_empty() {
                    sv.inflight.remove(&self.from);
                }
            }
        }
        self.inner.served_tx.send_modify(|n| *n = n.wrapping_add(1));
    }
}

fn encode_response(id: u64, status: Status, payload: Bytes) -> Result<Bytes, String> {
    let mut b = BytesMut::new();
    Response {
        id,
        status,
        payload,
    }
    .encode(&mut b)
    .map_err(|e| format!("cannot encode the answer: {e}"))?;
    Ok(b.freeze())
}

/// A client write registered with the ledger ([`GhostLedger::write_started`]); dropped
/// without an acknowledgement, it ends the flight as abandoned.
struct InFlight<'a> {
    io: &'a Arc<Inner>,
    id: Option<crate::ghost::FlightId>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.io.lock().ledger.flight_abandoned(id);
        }
    }
}
