//! `RedirectingLun` with in-process nodes: every node's SAN path is a `FaultLun` over one shared
//! `MemLun`, and the LAN is an in-process `PeerTransport` that can take a peer down, hang it, or
//! kill it with requests in flight. Time is tokio's paused clock, so timeouts are exact and fast.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use csv_core::lun::{
    Cached, FaultError, FaultHandle, FaultLun, IoFence, Lun, LunError, MemLun, OpSet, ZeroCopy,
};
use csv_core::meta::{NodeId, PathState, SessionId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redirector::frame::{Request, RequestBody, Response, Status};
use redirector::peer::{BoxFuture, encode_envelope};
use redirector::policy::{Mode, PolicyConfig, Reason};
use redirector::{
    FenceCheck, FenceVerdict, NoFence, PeerService, PeerTransport, PlainPath, RedirectingLun,
    RedirectorConfig, TransportError,
};
use tokio::sync::watch;
use tokio::time::Instant;

const BLOCK: usize = 4096;
const LUN_SIZE: u64 = 1 << 20;
/// How often the daemon refreshes a node's view of its peers' path health (`PEER_REFRESH` of the
/// csvd crate, which this crate cannot name).
const PEER_REFRESH: Duration = Duration::from_millis(300);
/// The random-fault nemesis never leaves every SAN path down at once for longer than this...
const TOTAL_OUTAGE_MAX: Duration = Duration::from_millis(500);
/// ...and then leaves node 1's restored path alone this long.
const RESUME_GRACE: Duration = Duration::from_millis(1_000);

fn cfg() -> RedirectorConfig {
    RedirectorConfig {
        policy: PolicyConfig {
            error_threshold: 3,
            error_window_ms: 2_000,
            io_timeout_ms: 200,
            probe_interval_ms: 100,
            failback_healthy_ms: 1_000,
            failback_max_ms: 8_000,
            flap_window_ms: 5_000,
            flap_decay_ms: 20_000,
            pause_bound_ms: 3_000,
            peer_retry_ms: 500,
        },
        ghost_budget_bytes: 1 << 20,
        dead_peer_drain_ms: 1_000,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerFault {
    None,
    /// Requests are received but not executed until the fault changes (then they execute).
    Hang,
    /// The process died (its session ends with it): requests waiting in a hang are lost
    /// unexecuted.
    Killed,
    /// The connection is lost: callers get `Lost` at once, while requests already received keep
    /// waiting and execute once the fault is `None` again (a live peer out of reach, or a dead
    /// one whose SAN target still holds them), or are lost if it becomes `Killed`.
    Cut,
}

/// The in-process LAN.
#[derive(Default)]
struct Net {
    services: Mutex<BTreeMap<NodeId, PeerService>>,
    faults: Mutex<BTreeMap<NodeId, watch::Sender<PeerFault>>>,
    /// Each node's session (`None` while it holds none); a node starts with `1000 + id`.
    sessions: Mutex<BTreeMap<NodeId, Option<SessionId>>>,
}

impl Net {
    fn fault_tx(&self, peer: NodeId) -> watch::Sender<PeerFault> {
        self.faults
            .lock()
            .unwrap()
            .entry(peer)
            .or_insert_with(|| watch::channel(PeerFault::None).0)
            .clone()
    }

    /// Sets `peer`'s fault; `Killed` ends its session, and leaving `Killed` (a restart) opens a
    /// new one.
    fn set(&self, peer: NodeId, f: PeerFault) {
        let was = self.fault_tx(peer).send_replace(f);
        if f == PeerFault::Killed {
            self.set_session(peer, None);
        } else if was == PeerFault::Killed {
            self.set_session(peer, Some(2000 + peer));
        }
    }

    fn set_session(&self, node: NodeId, s: Option<SessionId>) {
        self.sessions.lock().unwrap().insert(node, s);
    }

    fn session(&self, node: NodeId) -> Option<SessionId> {
        let s = self.sessions.lock().unwrap().get(&node).copied();
        s.unwrap_or(Some(1000 + node))
    }
}

struct Transport {
    me: NodeId,
    net: Arc<Net>,
}

impl PeerTransport for Transport {
    fn call(&self, peer: NodeId, request: Bytes) -> BoxFuture<'_, Result<Bytes, TransportError>> {
        Box::pin(async move {
            let mut rx = self.net.fault_tx(peer).subscribe();
            let not_sent = move |why: &str| TransportError::NotSent {
                peer,
                reason: why.into(),
            };
            let lost = move || TransportError::Lost {
                peer,
                reason: "connection lost".into(),
            };
            match *rx.borrow_and_update() {
                PeerFault::Killed => return Err(not_sent("down")),
                PeerFault::Cut => return Err(not_sent("unreachable")),
                PeerFault::None | PeerFault::Hang => {}
            }
            let svc = self.net.services.lock().unwrap().get(&peer).cloned();
            let svc = svc.ok_or_else(|| not_sent("unknown peer"))?;
            // The request's fate at the peer, which the caller may stop waiting for.
            let mut at_peer = rx.clone();
            let me = self.me;
            let delivery = tokio::spawn(async move {
                loop {
                    match *at_peer.borrow_and_update() {
                        PeerFault::None => break,
                        PeerFault::Killed => return Err(lost()),
                        PeerFault::Hang | PeerFault::Cut => {}
                    }
                    if at_peer.changed().await.is_err() {
                        return Err(lost());
                    }
                }
                svc.handle(me, &request).await.map_err(|e| not_sent(&e))
            });
            let cut = async move {
                loop {
                    if matches!(*rx.borrow_and_update(), PeerFault::Cut | PeerFault::Killed) {
                        return;
                    }
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::select! {
                r = delivery => r.unwrap_or_else(|_| Err(lost())),
                _ = cut => Err(lost()),
            }
        })
    }

    fn incarnation(&self, node: NodeId) -> Option<SessionId> {
        self.net.session(node)
    }
}

struct Node {
    lun: RedirectingLun,
    fault: FaultHandle,
}

struct Cluster {
    disk: Arc<MemLun>,
    net: Arc<Net>,
    nodes: BTreeMap<NodeId, Node>,
}

impl Cluster {
    fn new(n: u64, fence: Arc<dyn FenceCheck>) -> Cluster {
        Self::with_cfg(n, fence, cfg())
    }

    fn with_cfg(n: u64, fence: Arc<dyn FenceCheck>, cfg: RedirectorConfig) -> Cluster {
        let disk = Arc::new(MemLun::new(LUN_SIZE));
        let net = Arc::new(Net::default());
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let path = FaultLun::new(disk.clone());
            let fault = path.handle();
            let transport = Arc::new(Transport {
                me: id,
                net: net.clone(),
            });
            let lun =
                RedirectingLun::new(id, Arc::new(PlainPath(path)), transport, cfg.clone()).unwrap();
            net.services
                .lock()
                .unwrap()
                .insert(id, lun.peer_service(fence.clone()));
            nodes.insert(id, Node { lun, fault });
        }
        let c = Cluster { disk, net, nodes };
        c.refresh_peers();
        c
    }

    /// What the daemon does from the node records: every node learns its peers' path health.
    fn refresh_peers(&self) {
        let health: Vec<(NodeId, bool)> = self
            .nodes
            .iter()
            .map(|(id, n)| (*id, n.lun.mode() == Mode::Direct))
            .collect();
        for n in self.nodes.values() {
            n.lun.update_peers(&health);
        }
    }

    fn lun(&self, id: NodeId) -> &RedirectingLun {
        &self.nodes[&id].lun
    }

    fn fault(&self, id: NodeId) -> &FaultHandle {
        &self.nodes[&id].fault
    }
}

fn block(tag: u8) -> Bytes {
    Bytes::from(vec![tag; BLOCK])
}

/// The tag of a block written by [`block`] (`None` if it is not one).
fn tag(b: &[u8]) -> Option<u8> {
    b.iter().all(|&x| x == b[0]).then_some(b[0])
}

async fn disk_block(c: &Cluster, idx: u64) -> Bytes {
    c.disk.read_at(idx * BLOCK as u64, BLOCK).await.unwrap()
}

/// Waits until node 1 has no unresolved ghost and no rewrite in flight.
async fn ledger_idle(c: &Cluster, limit: Duration) {
    eventually(limit, "ledger idle", async || c.lun(1).ghosts() == (0, 0)).await;
}

/// Polls `cond` on the paused clock until it holds, failing after `limit` of virtual time.
async fn eventually(limit: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_healthy_path_carries_all_io_directly() {
    let c = Cluster::new(2, Arc::new(NoFence));
    let lun = c.lun(1);
    lun.write_at(0, block(7), false).await.unwrap();
    lun.flush().await.unwrap();
    assert_eq!(tag(&lun.read_at(0, BLOCK).await.unwrap()), Some(7));
    assert_eq!(tag(&disk_block(&c, 0).await), Some(7));
    let s = lun.stats();
    assert_eq!((s.peer_attempts, s.timeouts), (0, 0));
    assert_eq!(lun.mode(), Mode::Direct);
    assert_eq!(lun.status().borrow().state, PathState::Direct);
    // Requests of their own fail as such, never as path trouble.
    assert!(matches!(
        lun.read_at(LUN_SIZE, BLOCK).await,
        Err(LunError::OutOfRange { .. })
    ));
    assert!(matches!(
        lun.write_at(1, block(1), false).await,
        Err(LunError::Misaligned { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_path_redirects_to_a_peer_and_publishes_why() {
    let c = Cluster::new(3, Arc::new(NoFence));
    let before = c.lun(1).status().borrow().since_ms;
    c.fault(1).fail_all(OpSet::ALL, FaultError::PathUnreachable);
    for i in 0..16u64 {
        c.lun(1)
            .write_at(i * BLOCK as u64, block(i as u8 + 1), false)
            .await
            .unwrap();
    }
    c.lun(1).flush().await.unwrap();
    for i in 0..16u64 {
        assert_eq!(
            tag(&c.lun(1).read_at(i * BLOCK as u64, BLOCK).await.unwrap()),
            Some(i as u8 + 1)
        );
        assert_eq!(tag(&disk_block(&c, i).await), Some(i as u8 + 1));
    }
    let Mode::Redirected { peer, reason } = c.lun(1).mode() else {
        panic!("not redirected: {:?}", c.lun(1).mode());
    };
    assert_eq!(reason, Reason::NoDiskConnectivity);
    let st = c.lun(1).status().borrow().clone();
    assert_eq!(st.state, PathState::Redirected);
    assert_eq!(st.peer, Some(peer));
    assert_eq!(st.reason.as_deref(), Some("no disk connectivity"));
    assert!(st.since_ms >= before);
    assert!(c.lun(1).stats().peer_attempts >= 16);
}

#[tokio::test(start_paused = true)]
async fn failback_happens_after_the_healthy_time_and_a_flapping_path_waits_longer() {
    let c = Cluster::new(2, Arc::new(NoFence));
    c.fault(1).fail_all(OpSet::ALL, FaultError::PathUnreachable);
    c.lun(1).write_at(0, block(1), false).await.unwrap();
    assert!(matches!(c.lun(1).mode(), Mode::Redirected { .. }));
    c.fault(1).clear();
    let t0 = Instant::now();
    eventually(Duration::from_secs(5), "failback", async || {
        c.lun(1).mode() == Mode::Direct
    })
    .await;
    let first = t0.elapsed();
    assert!(
        first >= Duration::from_millis(1_000),
        "failed back after {first:?}, before the healthy time"
    );
    // Fails again right away: a flap doubles the healthy time.
    c.fault(1).fail_all(OpSet::ALL, FaultError::PathUnreachable);
    c.lun(1).write_at(0, block(2), false).await.unwrap();
    c.fault(1).clear();
    let t1 = Instant::now();
    eventually(Duration::from_secs(10), "second failback", async || {
        c.lun(1).mode() == Mode::Direct
    })
    .await;
    assert!(
        t1.elapsed() >= Duration::from_millis(2_000),
        "{:?}",
        t1.elapsed()
    );
    assert_eq!(tag(&c.lun(1).read_at(0, BLOCK).await.unwrap()), Some(2));
    assert_eq!(c.lun(1).status().borrow().state, PathState::Direct);
}

#[tokio::test(start_paused = true)]
async fn a_hung_write_is_reissued_and_its_late_landing_never_shows_old_data() {
    let c = Cluster::new(2, Arc::new(NoFence));
    c.lun(1).write_at(0, block(1), false).await.unwrap();
    c.fault(1).hang();
    // Hangs on the path, times out, is re-issued through node 2.
    let t = Instant::now();
    c.lun(1).write_at(0, block(2), false).await.unwrap();
    let stall = t.elapsed();
    assert!(stall >= Duration::from_millis(200) && stall < Duration::from_millis(400));
    assert_eq!(c.fault(1).hung(), 1, "the ghost is still inside the path");
    assert_eq!(c.lun(1).ghosts().0, 1);
    // Newer data for the same block goes through the LAN.
    c.lun(1).write_at(0, block(3), false).await.unwrap();
    assert_eq!(tag(&disk_block(&c, 0).await), Some(3));
    // The path resumes late: the ghost (block 2) lands on the LUN, rolling it back...
    c.fault(1).release();
    // ... but node 1 never reads it, and once the ghost has resolved nobody does.
    for _ in 0..50 {
        assert_eq!(tag(&c.lun(1).read_at(0, BLOCK).await.unwrap()), Some(3));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ledger_idle(&c, Duration::from_secs(2)).await;
    assert_eq!(tag(&disk_block(&c, 0).await), Some(3));
    assert_eq!(tag(&c.lun(2).read_at(0, BLOCK).await.unwrap()), Some(3));
    let s = c.lun(1).stats();
    assert!(
        s.reissues >= 1 && s.ghosts_resolved >= 1 && s.rewrites >= 1,
        "{s:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn with_no_path_and_no_peer_io_pauses_then_fails_cleanly_after_the_bound() {
    let c = Cluster::new(1, Arc::new(NoFence));
    c.fault(1).fail_all(OpSet::ALL, FaultError::PathUnreachable);
    let t = Instant::now();
    let err = c.lun(1).write_at(0, block(1), false).await.unwrap_err();
    let waited = t.elapsed();
    assert!(matches!(err, LunError::PathUnreachable { .. }), "{err}");
    assert!(
        waited >= Duration::from_millis(3_000) && waited < Duration::from_millis(3_500),
        "{waited:?}"
    );
    assert_eq!(c.lun(1).status().borrow().state, PathState::Paused);
    assert!(
        c.lun(1)
            .status()
            .borrow()
            .reason
            .as_deref()
            .unwrap()
            .contains("no healthy peer")
    );
    // Past the bound, new I/O fails fast.
    let t = Instant::now();
    assert!(c.lun(1).read_at(0, BLOCK).await.is_err());
    assert!(t.elapsed() < Duration::from_millis(100));
    // The path comes back: I/O works again.
    c.fault(1).clear();
    eventually(Duration::from_secs(2), "resume", async || {
        c.lun(1).mode() == Mode::Direct
    })
    .await;
    c.lun(1).write_at(0, block(2), false).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn paused_io_resumes_without_errors_when_a_path_returns_within_the_bound() {
    let c = Cluster::new(1, Arc::new(NoFence));
    c.fault(1).fail_all(OpSet::ALL, FaultError::PathUnreachable);
    let lun = c.lun(1).clone();
    let writers: Vec<_> = (0..8u64)
        .map(|i| {
            let lun = lun.clone();
            tokio::spawn(async move {
                lun.write_at(i * BLOCK as u64, block(i as u8 + 10), false)
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(matches!(c.lun(1).mode(), Mode::Paused { .. }));
    c.fault(1).clear();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    for i in 0..8u64 {
        assert_eq!(tag(&disk_block(&c, i).await), Some(i as u8 + 10));
    }
}

/// Node 1 loses its SAN path and writes block 0 (tag 1) through a peer; returns that peer.
async fn redirect_node1(c: &Cluster) -> NodeId {
    c.fault(1).fail_all(OpSet::ALL, FaultError::PathUnreachable);
    c.lun(1).write_at(0, block(1), false).await.unwrap();
    let Mode::Redirected { peer, .. } = c.lun(1).mode() else {
        panic!("not redirected: {:?}", c.lun(1).mode())
    };
    peer
}

#[tokio::test(start_paused = true)]
async fn a_redirect_peer_that_dies_mid_io_is_replaced_and_nothing_is_lost() {
    let c = Cluster::new(3, Arc::new(NoFence));
    let first = redirect_node1(&c).await;
    let other = if first == 2 { 3 } else { 2 };
    // The peer hangs with writes inside, then dies: they are lost unexecuted.
    c.net.set(first, PeerFault::Hang);
    let lun = c.lun(1).clone();
    let writers: Vec<_> = (0..8u64)
        .map(|i| {
            let lun = lun.clone();
            tokio::spawn(async move {
                lun.write_at(i * BLOCK as u64, block(i as u8 + 20), false)
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.net.set(first, PeerFault::Killed);
    for w in writers {
        w.await.unwrap().unwrap();
    }
    assert_eq!(
        c.lun(1).mode(),
        Mode::Redirected {
            peer: other,
            reason: Reason::NoDiskConnectivity
        }
    );
    for i in 0..8u64 {
        assert_eq!(tag(&disk_block(&c, i).await), Some(i as u8 + 20));
        assert_eq!(
            tag(&c.lun(1).read_at(i * BLOCK as u64, BLOCK).await.unwrap()),
            Some(i as u8 + 20)
        );
    }
}

/// Node 1 redirects to a peer; the peer hangs with a write of block 0 inside (tag 2), which
/// times out and is re-issued through the other peer; then the first peer's connection is cut.
/// Returns (first peer, other peer).
async fn strand_a_write_at_a_peer(c: &Cluster) -> (NodeId, NodeId) {
    let first = redirect_node1(c).await;
    let other = if first == 2 { 3 } else { 2 };
    c.net.set(first, PeerFault::Hang);
    c.lun(1).write_at(0, block(2), false).await.unwrap();
    assert_eq!(
        c.lun(1).ghosts().0,
        1,
        "the write stuck at the peer is a ghost"
    );
    c.net.set(first, PeerFault::Cut);
    // Newer data for the block, acknowledged through the other peer.
    c.lun(1).write_at(0, block(3), false).await.unwrap();
    assert_eq!(tag(&disk_block(c, 0).await), Some(3));
    (first, other)
}

#[tokio::test(start_paused = true)]
async fn a_dead_peers_stuck_write_landing_after_the_io_timeout_never_rolls_back_data() {
    let c = Cluster::new(3, Arc::new(NoFence));
    let (first, other) = strand_a_write_at_a_peer(&c).await;
    // The peer dies (its session ends) while its SAN target still holds the write.
    c.net.set_session(first, None);
    // Well past the I/O timeout, within the drain time: still unresolved.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(c.lun(1).ghosts(), (1, 0), "resolved before the drain time");
    // The target executes the dead peer's write late: the LUN is rolled back...
    c.net.set(first, PeerFault::None);
    eventually(Duration::from_secs(1), "the late landing", async || {
        tag(&disk_block(&c, 0).await) == Some(2)
    })
    .await;
    c.net.set(first, PeerFault::Killed);
    // ... node 1 never reads it, and after the drain time the ledger restores the newest data.
    assert_eq!(tag(&c.lun(1).read_at(0, BLOCK).await.unwrap()), Some(3));
    ledger_idle(&c, Duration::from_secs(2)).await;
    assert_eq!(tag(&disk_block(&c, 0).await), Some(3));
    assert_eq!(tag(&c.lun(other).read_at(0, BLOCK).await.unwrap()), Some(3));
    let s = c.lun(1).stats();
    assert_eq!((s.lost_settled, s.lost_drained), (0, 1), "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn a_live_peer_out_of_reach_keeps_its_stuck_write_unresolved_until_it_settles_it() {
    let c = Cluster::new(3, Arc::new(NoFence));
    let (first, other) = strand_a_write_at_a_peer(&c).await;
    // The peer is alive (same session) but out of reach: no amount of time resolves the write.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        c.lun(1).ghosts(),
        (1, 0),
        "resolved while the peer could still execute it"
    );
    assert_eq!(tag(&c.lun(1).read_at(0, BLOCK).await.unwrap()), Some(3));
    // Reachable again: the stuck write executes (rolling the LUN back), the peer settles it,
    // and the ledger restores the newest data.
    c.net.set(first, PeerFault::None);
    ledger_idle(&c, Duration::from_secs(3)).await;
    assert_eq!(tag(&disk_block(&c, 0).await), Some(3));
    assert_eq!(tag(&c.lun(other).read_at(0, BLOCK).await.unwrap()), Some(3));
    assert_eq!(tag(&c.lun(first).read_at(0, BLOCK).await.unwrap()), Some(3));
    let s = c.lun(1).stats();
    assert_eq!((s.lost_settled, s.lost_drained), (1, 0), "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn many_writes_lost_at_one_peer_share_one_settle_at_a_time() {
    let c = Cluster::new(3, Arc::new(NoFence));
    let first = redirect_node1(&c).await;
    // Eight writes get stuck in the peer's own hung path, time out and go elsewhere; then the
    // connection is lost, so all eight answers are lost.
    c.fault(first).hang();
    let lun = c.lun(1).clone();
    let writers: Vec<_> = (0..8u64)
        .map(|i| {
            let lun = lun.clone();
            tokio::spawn(async move { lun.write_at(i * BLOCK as u64, block(2), false).await })
        })
        .collect();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    assert_eq!(c.fault(first).hung(), 8);
    c.net.set(first, PeerFault::Cut);
    for i in 0..8u64 {
        c.lun(1)
            .write_at(i * BLOCK as u64, block(3), false)
            .await
            .unwrap();
    }
    // Reachable again, its path still hung: settles wait there, one at a time.
    c.net.set(first, PeerFault::None);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(c.lun(1).ghosts().0, 8);
    let asked = c.lun(first).stats().settles_served;
    // One settle per 4 x io_timeout (800 ms) at most, not one per lost write.
    eprintln!("{asked} settles in 10 s");
    assert!((1..=14).contains(&asked), "{asked} settles in 10 s");
    // The path resumes: the stuck writes land, one settle answers for all eight, and the
    // ledger restores the newest data.
    c.fault(first).release();
    ledger_idle(&c, Duration::from_secs(5)).await;
    for i in 0..8u64 {
        assert_eq!(tag(&disk_block(&c, i).await), Some(3), "block {i}");
    }
    let s = c.lun(1).stats();
    assert_eq!((s.lost_settled, s.lost_drained), (8, 0), "{s:?}");
    assert!(c.lun(first).stats().settles_served <= asked + 2);
}

fn wire(id: u64, body: RequestBody) -> Bytes {
    let req = Request {
        id,
        offset: 0,
        token: 0,
        node: 1,
        body,
    };
    encode_envelope("", &req).unwrap()
}

fn answer(b: &[u8]) -> Response {
    Response::decode(&mut bytes::BytesMut::from(b))
        .unwrap()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_settle_waits_for_the_senders_earlier_requests_and_refuses_them_from_then_on() {
    let c = Cluster::new(2, Arc::new(NoFence));
    let svc = c.net.services.lock().unwrap()[&2].clone();
    let epoch = 5u64 << 40;
    let write = |tag| RequestBody::Write {
        data: block(tag),
        fua: false,
    };
    // An earlier request is stuck on the peer's path: the settle waits for it.
    c.fault(2).hang();
    let stuck = {
        let (svc, w) = (svc.clone(), wire(epoch | 10, write(7)));
        tokio::spawn(async move { svc.handle(1, &w).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let settle = {
        let (svc, w) = (svc.clone(), wire(epoch | 12, RequestBody::Settle));
        tokio::spawn(async move { svc.handle(1, &w).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!settle.is_finished(), "settled with a request in flight");
    c.fault(2).release();
    let r = answer(&settle.await.unwrap().unwrap());
    assert_eq!((r.id, r.status), (epoch | 12, Status::Ok));
    assert_eq!(r.payload, Bytes::from(1002u64.to_be_bytes().to_vec()));
    assert_eq!(answer(&stuck.await.unwrap().unwrap()).status, Status::Ok);
    assert_eq!(tag(&disk_block(&c, 0).await), Some(7));
    // An earlier request that arrives only now (same epoch, or the epoch before) is refused
    // without touching the LUN.
    for id in [epoch | 11, (4 << 40) | 999] {
        let r = answer(&svc.handle(1, &wire(id, write(8))).await.unwrap());
        assert_eq!((r.id, r.status), (id, Status::PathError));
    }
    assert_eq!(tag(&disk_block(&c, 0).await), Some(7));
    // Later requests, and those of another process of the sender (another epoch), are served
    // (once the peer trusts its own path again after the hang).
    eventually(Duration::from_secs(10), "node 2 direct again", async || {
        c.lun(2).mode() == Mode::Direct
    })
    .await;
    for (id, t) in [(epoch | 13, 9), ((77 << 40) | 1, 10)] {
        let r = answer(&svc.handle(1, &wire(id, write(t))).await.unwrap());
        assert_eq!(r.status, Status::Ok);
        assert_eq!(tag(&disk_block(&c, 0).await), Some(t));
    }
    // Another sender is not affected by node 1's settle.
    let other = Request {
        id: epoch | 1,
        offset: 0,
        token: 0,
        node: 3,
        body: write(11),
    };
    let r = answer(
        &svc.handle(3, &encode_envelope("", &other).unwrap())
            .await
            .unwrap(),
    );
    assert_eq!(r.status, Status::Ok);
}

#[tokio::test(start_paused = true)]
async fn a_peer_whose_own_path_fails_answers_path_error_and_another_peer_is_used() {
    let c = Cluster::new(3, Arc::new(NoFence));
    c.fault(1).fail_all(OpSet::ALL, FaultError::PathUnreachable);
    c.fault(2).fail_all(OpSet::ALL, FaultError::PathUnreachable);
    // Node 2 still looks healthy in the records: it learns about its path from our request.
    for i in 0..4u64 {
        c.lun(1)
            .write_at(i * BLOCK as u64, block(30 + i as u8), false)
            .await
            .unwrap();
    }
    assert!(matches!(c.lun(1).mode(), Mode::Redirected { peer: 3, .. }));
    assert_ne!(
        c.lun(2).mode(),
        Mode::Direct,
        "node 2 learned its path is bad"
    );
    // A peer whose path is known bad refuses at once, without touching its path.
    let req = Request {
        id: 5,
        offset: 0,
        token: 0,
        node: 1,
        body: RequestBody::Read { len: 4096 },
    };
    let svc = c.net.services.lock().unwrap()[&2].clone();
    let answer = svc
        .handle(1, &encode_envelope("", &req).unwrap())
        .await
        .unwrap();
    let r = Response::decode(&mut bytes::BytesMut::from(&answer[..]))
        .unwrap()
        .unwrap();
    assert_eq!((r.id, r.status), (5, Status::PathError));
}

/// A lock table: key -> current token.
struct Locks(Mutex<BTreeMap<String, u64>>);

impl FenceCheck for Locks {
    fn may_write(&self) -> bool {
        true
    }

    fn check(&self, key: &str, token: u64) -> BoxFuture<'_, FenceVerdict> {
        let cur = self.0.lock().unwrap().get(key).copied().unwrap_or(0);
        Box::pin(async move {
            if token == cur {
                FenceVerdict::Valid
            } else {
                FenceVerdict::Stale { current: cur }
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn peers_refuse_redirected_writes_with_stale_tokens() {
    let locks = Arc::new(Locks(Mutex::new(BTreeMap::from([("data:7".into(), 12)]))));
    let c = Cluster::new(2, locks.clone());
    c.fault(1).fail_all(OpSet::ALL, FaultError::PathUnreachable);
    let fence = |token| {
        Some(IoFence {
            key: "data:7".into(),
            token,
        })
    };
    c.lun(1)
        .write_fenced(0, block(1), false, fence(12))
        .await
        .unwrap();
    let err = c
        .lun(1)
        .write_fenced(0, block(2), false, fence(11))
        .await
        .unwrap_err();
    assert!(matches!(err, LunError::Fenced { token: 11 }), "{err}");
    assert_eq!(tag(&disk_block(&c, 0).await), Some(1));
    // The lock moves on: the old holder's writes are refused from then on.
    locks.0.lock().unwrap().insert("data:7".into(), 13);
    assert!(
        c.lun(1)
            .write_fenced(0, block(3), false, fence(12))
            .await
            .is_err()
    );
    assert_eq!(tag(&disk_block(&c, 0).await), Some(1));
    assert_eq!(c.lun(2).stats().refused_stale, 2);
}

#[tokio::test(start_paused = true)]
async fn a_damaged_payload_is_answered_with_crc_mismatch() {
    let c = Cluster::new(2, Arc::new(NoFence));
    let req = Request {
        id: 77,
        offset: 0,
        token: 0,
        node: 1,
        body: RequestBody::Write {
            data: block(5),
            fua: false,
        },
    };
    let mut wire = encode_envelope("", &req).unwrap().to_vec();
    let n = wire.len();
    wire[n - 1] ^= 0xff;
    let svc = c.net.services.lock().unwrap()[&2].clone();
    let answer = svc.handle(1, &wire).await.unwrap();
    let r = Response::decode(&mut bytes::BytesMut::from(&answer[..]))
        .unwrap()
        .unwrap();
    assert_eq!((r.id, r.status), (77, Status::CrcMismatch));
    assert_eq!(disk_block(&c, 0).await, Bytes::from(vec![0u8; BLOCK]));
    // A request claiming to come from another node is refused outright.
    let wire = encode_envelope("", &req).unwrap();
    assert!(svc.handle(3, &wire).await.is_err());
}

/// A node whose lease lapsed.
struct Lapsed;

impl FenceCheck for Lapsed {
    fn check(&self, _key: &str, _token: u64) -> BoxFuture<'_, FenceVerdict> {
        Box::pin(async { FenceVerdict::Valid })
    }

    fn may_write(&self) -> bool {
        false
    }
}

#[tokio::test(start_paused = true)]
async fn a_peer_whose_lease_lapsed_writes_nothing_for_others() {
    let c = Cluster::new(2, Arc::new(Lapsed));
    let svc = c.net.services.lock().unwrap()[&2].clone();
    let write = |id| {
        wire(
            id,
            RequestBody::Write {
                data: block(4),
                fua: false,
            },
        )
    };
    let r = answer(&svc.handle(1, &write(1)).await.unwrap());
    assert_eq!((r.id, r.status), (1, Status::PathError));
    assert_eq!(disk_block(&c, 0).await, Bytes::from(vec![0u8; BLOCK]));
    // Reads are still served.
    let r = answer(
        &svc.handle(1, &wire(2, RequestBody::Read { len: BLOCK as u32 }))
            .await
            .unwrap(),
    );
    assert_eq!((r.status, r.payload.len()), (Status::Ok, BLOCK));
}

#[tokio::test(start_paused = true)]
async fn a_user_redirect_moves_io_to_a_peer_and_back() {
    let c = Cluster::new(2, Arc::new(NoFence));
    c.lun(1).set_user_redirect(true);
    assert_eq!(
        c.lun(1).mode(),
        Mode::Redirected {
            peer: 2,
            reason: Reason::UserRequest
        }
    );
    c.lun(1).write_at(0, block(9), false).await.unwrap();
    assert_eq!(c.lun(1).stats().peer_attempts, 1);
    assert_eq!(
        c.lun(1).status().borrow().reason.as_deref(),
        Some("user request")
    );
    c.lun(1).set_user_redirect(false);
    assert_eq!(c.lun(1).mode(), Mode::Direct);
    assert_eq!(tag(&c.lun(1).read_at(0, BLOCK).await.unwrap()), Some(9));
}

// ---- randomized: concurrent verifying workload under random faults ----

/// A self-describing block: (block index, writer, sequence) repeated, so a read names the write
/// it came from.
fn stamp(idx: u64, writer: u64, seq: u64) -> Bytes {
    let mut v = Vec::with_capacity(BLOCK);
    while v.len() < BLOCK {
        v.extend_from_slice(&idx.to_le_bytes());
        v.extend_from_slice(&writer.to_le_bytes());
        v.extend_from_slice(&seq.to_le_bytes());
        v.extend_from_slice(&[0xA5; 8]);
    }
    Bytes::from(v)
}

fn unstamp(b: &[u8]) -> (u64, u64, u64) {
    let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    assert!(b.chunks(32).all(|c| c == &b[..32]), "torn or foreign block");
    (u(0), u(8), u(16))
}

/// A peer's LAN state in the random nemesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lan {
    Up,
    Hang,
    Cut,
    /// Dead; its SAN target executes what it holds by `land_at` (then `None`).
    Killed {
        land_at: Option<Instant>,
    },
    /// Dead, with requests stuck in its SAN target, which executes them at `land_at`.
    Dead {
        land_at: Instant,
    },
}

async fn random_faults_run(seed: u64) {
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let c = Arc::new(Cluster::new(3, Arc::new(NoFence)));
    const BLOCKS: u64 = 8;
    // Each writer owns its blocks (one writer per block, like a file's lock holder), and checks
    // after every acknowledged write that reading it back gives exactly that write, and that no
    // read ever returns an older write than the last acknowledged one.
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let c = c.clone();
        let mut wr = StdRng::seed_from_u64(seed ^ ((w + 1) * 0x9e37));
        tasks.push(tokio::spawn(async move {
            let mut last = BTreeMap::new();
            for seq in 1..=150u64 {
                let idx = w * BLOCKS + wr.random_range(0..BLOCKS);
                let lun = c.lun(1);
                let off = idx * BLOCK as u64;
                lun.write_at(off, stamp(idx, w, seq), false).await.unwrap();
                last.insert(idx, seq);
                let pick = w * BLOCKS + wr.random_range(0..BLOCKS);
                let got = lun.read_at(pick * BLOCK as u64, BLOCK).await.unwrap();
                match last.get(&pick) {
                    Some(&s) => assert_eq!(unstamp(&got), (pick, w, s), "stale read"),
                    None => assert!(got.iter().all(|&b| b == 0)),
                }
                tokio::time::sleep(Duration::from_millis(wr.random_range(0..30))).await;
            }
            last
        }));
    }
    // The daemon's peer view: every node learns its peers' path health from the node records
    // every `PEER_REFRESH`. Without it a node keeps a stale view for seconds (it once kept both
    // peers "unhealthy" for 3.8 s while paused, though one of them was direct meanwhile).
    let refresher = {
        let c = c.clone();
        tokio::spawn(async move {
            loop {
                c.refresh_peers();
                tokio::time::sleep(PEER_REFRESH).await;
            }
        })
    };
    // The nemesis: hangs (ghost writes), unreachable paths and error bursts on node 1 and its
    // peers, and LAN faults of the peers (hung, cut off while alive, killed, or dead with node
    // 1's writes stuck in their SAN target, which lands them within the drain time: the
    // assumption of `docs/fencing.md` §4a), until the writers are done. The writers unwrap every write, which the redirector
    // guarantees only while node 1 has its own path or a peer within `pause_bound_ms`; so the
    // nemesis never leaves all three SAN paths down (hung or failing every request) for more
    // than `TOTAL_OUTAGE_MAX`: it then restores node 1's path and leaves it alone for
    // `RESUME_GRACE`, so node 1 resumes on it well within the bound. Node 1 still pauses (its
    // path down and its peers down, hung, recovering or skipped after a failure), but never
    // past the bound because of the nemesis alone.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let nemesis = {
        let (c, done) = (c.clone(), done.clone());
        tokio::spawn(async move {
            // Per node: (hung, failing every request).
            let mut down = [(false, false); 4];
            let mut lan = [Lan::Up; 4];
            let mut next_session = 3000;
            let mut outage_since: Option<Instant> = None;
            let mut spare_node1_until = Instant::now();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let node = if rng.random_bool(0.5) {
                    1
                } else {
                    rng.random_range(2..4)
                };
                let action = rng.random_range(0..15);
                let breaks = matches!(action, 0..=2 | 5);
                if !(node == 1 && breaks && Instant::now() < spare_node1_until) {
                    let d = &mut down[node as usize];
                    match action {
                        0..=2 => {
                            c.fault(node).hang();
                            d.0 = true;
                        }
                        3..=4 => {
                            c.fault(node).release();
                            d.0 = false;
                        }
                        5 => {
                            c.fault(node)
                                .fail_all(OpSet::ALL, FaultError::PathUnreachable);
                            d.1 = true;
                        }
                        6..=7 => {
                            c.fault(node).clear();
                            *d = (false, false);
                        }
                        8 => {
                            c.fault(node)
                                .set_error_rate(OpSet::ALL, 0.05, FaultError::Io(5), seed)
                        }
                        10..=14 if node != 1 => {
                            let l = &mut lan[node as usize];
                            match (action, *l) {
                                (10, Lan::Up) => {
                                    c.net.set(node, PeerFault::Hang);
                                    *l = Lan::Hang;
                                }
                                (11, Lan::Up | Lan::Hang) => {
                                    c.net.set(node, PeerFault::Cut);
                                    *l = Lan::Cut;
                                }
                                (12, Lan::Up | Lan::Hang) => {
                                    c.net.set(node, PeerFault::Cut);
                                    c.net.set_session(node, None);
                                    let within = cfg().dead_peer_drain_ms * 9 / 10;
                                    let after = Duration::from_millis(rng.random_range(0..within));
                                    *l = Lan::Dead {
                                        land_at: Instant::now() + after,
                                    };
                                }
                                (13, Lan::Up | Lan::Hang | Lan::Cut) => {
                                    c.net.set(node, PeerFault::Killed);
                                    let within = cfg().dead_peer_drain_ms * 9 / 10;
                                    let after = Duration::from_millis(rng.random_range(0..within));
                                    *l = Lan::Killed {
                                        land_at: Some(Instant::now() + after),
                                    };
                                }
                                (14, Lan::Hang | Lan::Cut | Lan::Killed { land_at: None }) => {
                                    c.net.set(node, PeerFault::None);
                                    *l = Lan::Up;
                                }
                                _ => {}
                            }
                        }
                        _ => c.refresh_peers(),
                    }
                }
                let mut nap = Duration::from_millis(rng.random_range(20..400));
                // A dead peer's SAN target lands what it holds within the drain time (a dead
                // node's path is not hung past it: the assumption of `docs/fencing.md` §4a).
                for p in 2..4 {
                    let (Lan::Dead { land_at }
                    | Lan::Killed {
                        land_at: Some(land_at),
                    }) = lan[p as usize]
                    else {
                        continue;
                    };
                    if Instant::now() < land_at {
                        nap = nap.min(land_at - Instant::now());
                        continue;
                    }
                    c.fault(p).release();
                    down[p as usize].0 = false;
                    if matches!(lan[p as usize], Lan::Killed { .. }) {
                        lan[p as usize] = Lan::Killed { land_at: None };
                    } else {
                        // The stuck requests reach its SAN target; the node restarts.
                        c.net.set(p, PeerFault::None);
                        c.net.set_session(p, Some(next_session));
                        next_session += 1;
                        lan[p as usize] = Lan::Up;
                    }
                }
                let unusable = |n: usize| {
                    let (hung, failing) = down[n];
                    hung || failing || (n != 1 && lan[n] != Lan::Up)
                };
                if (1..4).all(unusable) {
                    let since = *outage_since.get_or_insert_with(Instant::now);
                    let left = (since + TOTAL_OUTAGE_MAX).saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        c.fault(1).clear();
                        down[1] = (false, false);
                        outage_since = None;
                        spare_node1_until = Instant::now() + RESUME_GRACE;
                    } else {
                        nap = nap.min(left);
                    }
                } else {
                    outage_since = None;
                }
                tokio::time::sleep(nap).await;
            }
            for n in 1..=3 {
                c.fault(n).clear();
            }
            for p in 2..4 {
                match lan[p as usize] {
                    Lan::Up => {}
                    Lan::Dead { .. } => {
                        c.net.set(p, PeerFault::None);
                        c.net.set_session(p, Some(next_session));
                        next_session += 1;
                    }
                    Lan::Hang | Lan::Cut | Lan::Killed { .. } => c.net.set(p, PeerFault::None),
                }
            }
            c.refresh_peers();
        })
    };
    let mut expected = BTreeMap::new();
    for (w, t) in tasks.into_iter().enumerate() {
        for (idx, seq) in t.await.unwrap() {
            expected.insert(idx, (w as u64, seq));
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    nemesis.await.unwrap();
    refresher.abort();
    // Once everything resolved, the LUN itself holds every last acknowledged write.
    ledger_idle(&c, Duration::from_secs(30)).await;
    let s = c.lun(1).stats();
    eprintln!("seed {seed}: {s:?}");
    for (idx, (w, seq)) in expected {
        let got = disk_block(&c, idx).await;
        assert_eq!(
            unstamp(&got),
            (idx, w, seq),
            "seed {seed}: lost write on block {idx}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn random_faults_never_lose_or_roll_back_acknowledged_writes() {
    let base: u64 = std::env::var("REDIRECT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    for i in 0..12 {
        random_faults_run(base.wrapping_add(i)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_node_learns_from_its_periodic_probe_that_its_path_is_gone_or_hung() {
    let c = Cluster::new(2, Arc::new(NoFence));
    c.fault(1).fail_all(OpSet::ALL, FaultError::PathUnreachable);
    eventually(Duration::from_secs(2), "redirect without I/O", async || {
        matches!(c.lun(1).mode(), Mode::Redirected { .. })
    })
    .await;
    assert_eq!(
        c.lun(1).status().borrow().reason.as_deref(),
        Some("no disk connectivity")
    );
    c.fault(2).hang();
    eventually(Duration::from_secs(2), "hung path noticed", async || {
        c.lun(2).mode()
            == Mode::Redirected {
                peer: 1,
                reason: Reason::PathHung,
            }
            || matches!(c.lun(2).mode(), Mode::Paused { .. })
    })
    .await;
    c.fault(2).release();
}

#[tokio::test(start_paused = true)]
async fn settle_waits_for_unresolved_ghosts_before_a_lock_may_move() {
    let c = Cluster::new(2, Arc::new(NoFence));
    c.fault(1).hang();
    c.lun(1).write_at(0, block(7), false).await.unwrap();
    assert_eq!(c.lun(1).ghosts().0, 1, "a ghost is unresolved");
    // While the ghost can still land, settle must not return Ok.
    let lun = c.lun(1).clone();
    let settle = tokio::spawn(async move { lun.settle().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !settle.is_finished(),
        "settle returned with a ghost unresolved"
    );
    // The path resumes: the ghost resolves, is rewritten with the newest data, and only
    // then does settle finish.
    c.fault(1).release();
    settle.await.unwrap().unwrap();
    assert_eq!(c.lun(1).ghosts(), (0, 0));
    assert_eq!(tag(&disk_block(&c, 0).await), Some(7));
}

#[tokio::test(start_paused = true)]
async fn settle_gives_up_after_the_pause_bound_so_the_caller_keeps_its_lock() {
    let c = Cluster::new(2, Arc::new(NoFence));
    c.fault(1).hang();
    c.lun(1).write_at(0, block(8), false).await.unwrap();
    let err = c.lun(1).settle().await.unwrap_err();
    assert!(matches!(err, LunError::Timeout { .. }), "{err:?}");
    c.fault(1).release();
}

/// Zero-copy reads (`Lun::read_cached`: spliced or mapped) come from the local page cache, so
/// the redirector offers them only while it reads directly: a redirected node reads through
/// its peer as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_taken_from_the_page_cache_only_while_the_node_reads_directly() {
    use csv_core::lun::file::{FileLun, FileLunOptions};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(LUN_SIZE)
        .unwrap();
    let net = Arc::new(Net::default());
    let mut luns = BTreeMap::new();
    for id in 1..=2u64 {
        let file = FileLun::open(&path, FileLunOptions::default()).unwrap();
        let transport = Arc::new(Transport {
            me: id,
            net: net.clone(),
        });
        let lun = RedirectingLun::new(id, Arc::new(PlainPath(file)), transport, cfg()).unwrap();
        net.services
            .lock()
            .unwrap()
            .insert(id, lun.peer_service(Arc::new(NoFence)));
        luns.insert(id, lun);
    }
    let refresh = |luns: &BTreeMap<NodeId, RedirectingLun>| {
        let health: Vec<(NodeId, bool)> = luns
            .iter()
            .map(|(id, l)| (*id, l.mode() == Mode::Direct))
            .collect();
        for l in luns.values() {
            l.update_peers(&health);
        }
    };
    refresh(&luns);
    let data: Bytes = (0..(64 << 10)).map(|i| (i % 199) as u8).collect();
    let l1 = &luns[&1];
    l1.write_at(8192, data.clone(), false).await.unwrap();
    // Direct: the written (so cached) range is taken both ways, and reads back intact.
    for how in [ZeroCopy::Splice, ZeroCopy::Map] {
        let cached = l1
            .read_cached(8192, data.len(), how)
            .expect("direct reads are taken from the page cache");
        assert_eq!(cached_bytes(cached), data, "{how:?}");
    }

    // Redirected by the operator: neither; the ordinary read goes through node 2.
    l1.set_user_redirect(true);
    eventually_real(|| l1.mode() != Mode::Direct, "node 1 redirects").await;
    for how in [ZeroCopy::Splice, ZeroCopy::Map] {
        assert!(l1.read_cached(8192, data.len(), how).is_none(), "{how:?}");
    }
    let before = l1.stats().peer_attempts;
    assert_eq!(l1.read_at(8192, data.len()).await.unwrap(), data);
    assert!(
        l1.stats().peer_attempts > before,
        "the read did not go through the peer"
    );

    // Back to direct: taken from the page cache again.
    l1.set_user_redirect(false);
    eventually_real(|| l1.mode() == Mode::Direct, "node 1 reads directly again").await;
    for how in [ZeroCopy::Splice, ZeroCopy::Map] {
        let cached = l1.read_cached(8192, data.len(), how).expect("direct again");
        assert_eq!(cached_bytes(cached), data, "{how:?}");
    }
}

/// What a client would receive of `cached`.
fn cached_bytes(cached: Cached) -> Bytes {
    match cached {
        Cached::Pipe(mut p) => p.drain().unwrap(),
        Cached::Mapped(m) => Bytes::from(m.copy_out().unwrap()),
    }
}

/// Polls `cond` in real time (for LUNs doing real file I/O), failing after 10 s.
async fn eventually_real(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
