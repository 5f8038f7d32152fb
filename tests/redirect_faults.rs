//! The I/O redirector on a real local cluster (`--san nbdkit`): a verifying block workload runs
//! through node 1's LUN (the diagnostic service) while SAN path faults hit it. Every test asserts
//! zero errors at the client, zero rolled-back reads, zero lost writes (checked through other
//! nodes too, once every ghost write has resolved), and measures the stall (slowest request).
//!
//! The tests share the machine's two cores, so they run one at a time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::TestCluster;
use csvd::client::ClusterStatus;
use csvd::cluster::{ClusterFile, SanMode};
use csvd::config::RedirectorSection;
use csvd::fault::{self, Fault};
use csvd::redirect::{DiagReply, DiagRequest, diag};
use csvd::workload::{Report, Workload};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn fast_redirector() -> RedirectorSection {
    RedirectorSection {
        io_timeout_ms: 800,
        probe_interval_ms: 200,
        failback_healthy_ms: 2_000,
        failback_max_ms: 8_000,
        flap_window_ms: 500,
        pause_bound_ms: 5_000,
        peer_retry_ms: 1_000,
        ..RedirectorSection::default()
    }
}

async fn cluster(nodes: usize) -> TestCluster {
    TestCluster::up_with(nodes, |o| {
        o.san = SanMode::Nbdkit;
        o.redirector = fast_redirector();
    })
    .await
}

fn inject(c: &mut TestCluster, node: u64, f: Fault) {
    let dir = c.path().to_path_buf();
    let csvd = c.opts.csvd.clone();
    tokio::task::block_in_place(|| fault::inject(&dir, node, f, &mut c.children, &csvd))
        .unwrap_or_else(|e| panic!("fault {f:?} on node {node}: {e:#}"));
    c.file = ClusterFile::load(&dir).unwrap();
    eprintln!("injected {f:?} on node {node}");
}

async fn status(c: &TestCluster) -> ClusterStatus {
    c.client().status().await.unwrap()
}

/// Waits until node `node`'s published path state is `path`; returns the status then.
async fn wait_path(c: &TestCluster, node: u64, path: &str, limit: Duration) -> ClusterStatus {
    let deadline = Instant::now() + limit;
    loop {
        let st = status(c).await;
        if st.nodes.iter().any(|n| n.id == node && n.path == path) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} not {path} within {limit:?}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Takes node 1's SAN path down and waits until it redirects; returns (its redirect peer, the
/// third node).
async fn redirect_node1(c: &mut TestCluster) -> (u64, u64) {
    inject(c, 1, Fault::SanDown);
    let st = wait_path(c, 1, "redirected", Duration::from_secs(5)).await;
    let peer = st.nodes.iter().find(|n| n.id == 1).unwrap().peer.unwrap();
    (peer, if peer == 2 { 3 } else { 2 })
}

async fn ghosts(c: &TestCluster, node: u64) -> (u64, u64, String) {
    match diag(
        &c.client(),
        node,
        &DiagRequest::Stats,
        Duration::from_secs(10),
    )
    .await
    .unwrap()
    {
        DiagReply::Stats {
            ghosts,
            rewrites_in_flight,
            stats,
            ..
        } => (ghosts, rewrites_in_flight, format!("{stats:?}")),
        other => panic!("unexpected {other:?}"),
    }
}

fn workload(blocks_per_worker: u64) -> Workload {
    let seed = rand::random();
    eprintln!("workload seed {seed}");
    Workload {
        node: 1,
        workers: 8,
        blocks_per_worker,
        block_size: 4096,
        region: 128 << 20,
        write_pct: 60,
        seed,
    }
}

struct Running {
    w: Workload,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Report>,
}

fn start(c: &TestCluster, w: Workload) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let (client, w2, s2) = (Arc::new(c.client()), w.clone(), stop.clone());
    let task = tokio::spawn(async move { w2.run(client, s2).await });
    Running { w, stop, task }
}

/// Stops the workload, waits for node 1's ghosts to resolve, and checks everything through
/// every live node in `readers`.
async fn finish(c: &TestCluster, r: Running, readers: &[u64]) -> Report {
    r.stop.store(true, Ordering::Relaxed);
    let rep = r.task.await.unwrap();
    eprintln!(
        "workload: {} writes, {} reads, {:.0} ops/s, p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms at {} ms",
        rep.writes,
        rep.reads,
        rep.ops_per_s(),
        rep.p50_ms,
        rep.p99_ms,
        rep.max_ms,
        rep.max_at_ms
    );
    assert!(
        rep.errors.is_empty(),
        "errors at the client: {:?}",
        rep.errors
    );
    assert!(
        rep.violations.is_empty(),
        "rolled-back or corrupt reads: {:?}",
        rep.violations
    );
    assert!(rep.writes > 50, "the workload did too little: {rep:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (g, rw, stats) = ghosts(c, 1).await;
        if (g, rw) == (0, 0) {
            eprintln!("node 1 redirector: {stats}");
            break;
        }
        assert!(Instant::now() < deadline, "ghosts never resolved: {stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for &n in readers {
        let lost = r.w.verify(&c.client(), n, &rep).await;
        assert!(lost.is_empty(), "read through node {n}: {lost:?}");
    }
    rep
}

/// A SAN fault on node 1 during the workload: redirect with no error, stall bounded, the
/// state visible in `csvctl status`, failback after recovery.
async fn fault_during_workload(fault: Fault, reason: &str, stall_limit_ms: f64) -> Report {
    let _one = SERIAL.lock().await;
    let mut c = cluster(3).await;
    let r = start(&c, workload(4));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    inject(&mut c, 1, fault);
    let st = wait_path(&c, 1, "redirected", Duration::from_secs(5)).await;
    let n1 = st.nodes.iter().find(|n| n.id == 1).unwrap();
    assert_eq!(n1.reason.as_deref(), Some(reason), "{st:?}");
    assert!(n1.peer.is_some_and(|p| p != 1), "{st:?}");
    assert!(n1.since_ms.is_some_and(|s| s > 0), "{st:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    inject(&mut c, 1, Fault::SanUp);
    wait_path(&c, 1, "direct", Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let rep = finish(&c, r, &[1, 2, 3]).await;
    assert!(
        rep.max_ms <= stall_limit_ms,
        "stall {:.0} ms exceeds {stall_limit_ms} ms",
        rep.max_ms
    );
    rep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn san_down_redirects_without_errors_and_fails_back_after_san_up() {
    fault_during_workload(Fault::SanDown, "no disk connectivity", 2_000.0).await;
}

/// The ghost-write test: node 1's nbdkit is paused with writes inside it, the same blocks keep
/// being rewritten through the LAN, then the path resumes and the stale writes land late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn san_hang_with_late_ghost_writes_loses_nothing_and_nobody_reads_rolled_back_data() {
    fault_during_workload(Fault::SanHang, "path hung (I/O timed out)", 2_000.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn san_flaky_at_one_percent_surfaces_no_error() {
    let _one = SERIAL.lock().await;
    let mut c = cluster(3).await;
    let r = start(&c, workload(16));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    inject(&mut c, 1, Fault::SanFlaky { rate_pct: 1.0 });
    tokio::time::sleep(Duration::from_secs(5)).await;
    inject(&mut c, 1, Fault::SanUp);
    wait_path(&c, 1, "direct", Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    finish(&c, r, &[1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn san_slow_by_200ms_surfaces_no_error() {
    let _one = SERIAL.lock().await;
    let mut c = cluster(3).await;
    let r = start(&c, workload(16));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    inject(&mut c, 1, Fault::SanSlow { delay_ms: 200 });
    tokio::time::sleep(Duration::from_secs(3)).await;
    inject(&mut c, 1, Fault::SanUp);
    wait_path(&c, 1, "direct", Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rep = finish(&c, r, &[1, 2]).await;
    assert!(
        rep.max_ms >= 190.0,
        "the delay never applied: {:.0} ms",
        rep.max_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_redirect_peer_mid_io_reroutes_and_loses_nothing() {
    let _one = SERIAL.lock().await;
    let mut c = cluster(3).await;
    let r = start(&c, workload(8));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (peer, other) = redirect_node1(&mut c).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    inject(&mut c, peer, Fault::Kill);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = status(&c).await;
        let n1 = st.nodes.iter().find(|n| n.id == 1).unwrap();
        if n1.path == "redirected" && n1.peer == Some(other) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not rerouted to node {other}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rep = finish(&c, r, &[1, other]).await;
    assert!(rep.max_ms <= 3_000.0, "stall {:.0} ms", rep.max_ms);
}

/// The open defect of 2026-11-27 made deterministic: the redirect peer dies with node 1's writes
/// stuck in its SAN target, which executes them seconds later. Their ghosts must stay unresolved
/// until that can no longer happen (the peer's session is gone and its drain time has passed),
/// so the late landings are overwritten by the ledger's rewrites, never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peers_writes_landing_late_from_its_hung_san_never_roll_back_data() {
    let _one = SERIAL.lock().await;
    let mut c = cluster(3).await;
    let r = start(&c, workload(8));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (peer, other) = redirect_node1(&mut c).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Node 1's writes get stuck in the peer's SAN target, time out and go through the other.
    inject(&mut c, peer, Fault::SanHang);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    inject(&mut c, peer, Fault::Kill);
    let (ghosts_at_kill, _, stats) = ghosts(&c, 1).await;
    eprintln!("at the kill: {ghosts_at_kill} ghosts, {stats}");
    assert!(
        ghosts_at_kill > 0,
        "no write was stuck at the peer: {stats}"
    );
    // Past the I/O timeout, within the session TTL: the stuck writes land now.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    inject(&mut c, peer, Fault::SanUp);
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    let rep = finish(&c, r, &[1, other]).await;
    assert!(rep.max_ms <= 5_000.0, "stall {:.0} ms", rep.max_ms);
    // They resolved because the peer's process was gone and its drain time had passed.
    let (_, _, stats) = ghosts(&c, 1).await;
    assert!(!stats.contains("lost_drained: 0"), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_san_path_down_io_pauses_fails_with_eio_after_the_bound_and_resumes() {
    let _one = SERIAL.lock().await;
    let mut c = cluster(3).await;
    for n in 1..=3 {
        inject(&mut c, n, Fault::SanDown);
    }
    wait_path(&c, 1, "paused", Duration::from_secs(10)).await;
    let client = c.client();
    let write = |tag: u8| DiagRequest::Write {
        offset: 128 << 20,
        data: vec![tag; 4096],
        fua: false,
        fence: None,
    };
    // Paused past the bound: a clean EIO-class failure, not a hang.
    let t = Instant::now();
    let r = diag(&client, 1, &write(1), Duration::from_secs(30))
        .await
        .unwrap();
    let waited = t.elapsed();
    let DiagReply::Failed(why) = r else {
        panic!("write succeeded with no path: {r:?}")
    };
    assert!(why.contains("no SAN path"), "{why}");
    assert!(waited <= Duration::from_millis(5_500), "waited {waited:?}");
    let st = status(&c).await;
    let n1 = st.nodes.iter().find(|n| n.id == 1).unwrap();
    assert!(
        n1.reason
            .as_deref()
            .is_some_and(|r| r.contains("no healthy peer")),
        "{st:?}"
    );
    eprintln!("paused write failed after {waited:?}: {why}");
    // A path returning within the bound: queued writes complete without error.
    inject(&mut c, 2, Fault::SanUp);
    wait_path(&c, 2, "direct", Duration::from_secs(10)).await;
    wait_path(&c, 1, "redirected", Duration::from_secs(10)).await;
    inject(&mut c, 2, Fault::SanDown);
    wait_path(&c, 1, "paused", Duration::from_secs(10)).await;
    let pending: Vec<_> = (0..4u8)
        .map(|i| {
            let client = c.client();
            tokio::spawn(async move {
                let req = DiagRequest::Write {
                    offset: (128 << 20) + u64::from(i) * 4096,
                    data: vec![i + 10; 4096],
                    fua: false,
                    fence: None,
                };
                diag(&client, 1, &req, Duration::from_secs(30)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    inject(&mut c, 1, Fault::SanUp);
    for p in pending {
        let r = p.await.unwrap().unwrap();
        assert!(matches!(r, DiagReply::Done), "{r:?}");
    }
    for i in 0..4u8 {
        let r = diag(
            &client,
            1,
            &DiagRequest::Read {
                offset: (128 << 20) + u64::from(i) * 4096,
                len: 4096,
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert!(matches!(r, DiagReply::Data(ref d) if d.iter().all(|&b| b == i + 10)));
    }
}

/// A LAN fault: the redirect peer is isolated (its links cut, in a `--netns` cluster) while it
/// carries node 1's I/O. Requests to it time out with unknown outcome; node 1 re-issues them
/// through the third node, and once the link heals the stragglers resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolating_the_redirect_peer_reroutes_through_another_peer() {
    let _one = SERIAL.lock().await;
    let mut c = TestCluster::up_with(3, |o| {
        o.san = SanMode::Nbdkit;
        o.redirector = fast_redirector();
        o.netns = true;
    })
    .await;
    let r = start(&c, workload(8));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (peer, other) = redirect_node1(&mut c).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    inject(&mut c, peer, Fault::Isolate);
    tokio::time::sleep(Duration::from_secs(3)).await;
    inject(&mut c, peer, Fault::Heal);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rep = finish(&c, r, &[1, other]).await;
    assert!(rep.max_ms <= 2_500.0, "stall {:.0} ms", rep.max_ms);
}

/// Redirected writes carry the writer's lock key and fencing token; the peer checks them against
/// its replica of the lock table and refuses a stale one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_refuses_redirected_writes_whose_fencing_token_is_stale() {
    let _one = SERIAL.lock().await;
    let mut c = cluster(3).await;
    inject(&mut c, 1, Fault::SanDown);
    wait_path(&c, 1, "redirected", Duration::from_secs(5)).await;
    // Another grant first, so `token - 1` is a real (older) token, not 0 ("unfenced").
    let older = c.acquire(1, "data:41").await.unwrap();
    let token = c.acquire(1, "data:42").await.unwrap();
    assert_eq!(token, older + 1);
    let client = c.client();
    let write = |tag: u8, token: u64| DiagRequest::Write {
        offset: 130 << 20,
        data: vec![tag; 4096],
        fua: true,
        fence: Some(("data:42".into(), token)),
    };
    let ok = diag(&client, 1, &write(1, token), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(matches!(ok, DiagReply::Done), "{ok:?}");
    let stale = diag(&client, 1, &write(2, token - 1), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        matches!(&stale, DiagReply::Failed(e) if e.contains("stale")),
        "{stale:?}"
    );
    // The lock moves to node 2: node 1's token is stale from then on.
    c.call(
        1,
        lockmgr::rpc::message::Request::LockRelease {
            key: "data:42".into(),
        },
    )
    .await;
    let newer = c.acquire(2, "data:42").await.unwrap();
    assert!(newer > token);
    let late = diag(&client, 1, &write(3, token), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        matches!(&late, DiagReply::Failed(e) if e.contains("stale")),
        "{late:?}"
    );
    let read = diag(
        &client,
        3,
        &DiagRequest::Read {
            offset: 130 << 20,
            len: 4096,
        },
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(
        matches!(read, DiagReply::Data(ref d) if d.iter().all(|&b| b == 1)),
        "{read:?}"
    );
}
