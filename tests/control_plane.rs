//! The control plane with real `csvd` processes on loopback: leader failover, 16 nodes,
//! lock exclusion, session expiry, SIGSTOP fencing, restarts, refused peers, wrong LUNs.

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, csvd_bin};
use csvd::cluster;
use lockmgr::rpc::message::{Query, QueryReply, Reply, Request};

async fn lock_holder(c: &TestCluster, key: &str) -> Option<(u64, u64)> {
    let QueryReply::Locks(locks) = c.client().query(Query::Locks).await.unwrap() else {
        panic!("unexpected reply");
    };
    locks
        .into_iter()
        .find(|l| l.key == key)
        .and_then(|l| l.holders.first().map(|h| (h.node, h.token)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_elects_a_new_leader_after_kill9_of_the_leader() {
    let mut c = TestCluster::up(3).await;
    let old = c.leader_among(&[1, 2, 3], Duration::from_secs(10)).await;
    let t0 = Instant::now();
    c.kill9(old);
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != old).collect();
    let new = c.leader_among(&survivors, Duration::from_secs(30)).await;
    assert_ne!(new, old);
    // The new leader serves writes: a lock through a survivor.
    let token = c.acquire(survivors[0], "after-failover").await.unwrap();
    eprintln!(
        "leader {old} killed; node {new} leads and committed token {token} after {:?}",
        t0.elapsed()
    );
    // The killed node comes back and rejoins as a follower of the new leader.
    c.restart(old);
    let again = c.leader_among(&[1, 2, 3], Duration::from_secs(30)).await;
    assert!(survivors.contains(&again));
}

/// A killed leader restarts with its own committed vote, so openraft resumes it as the
/// leader of its old term until a peer answers with the newer one; a proposal made in that
/// window (the node registering itself) was never answered and the node hung in start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_restarted_after_a_new_election_rejoins_promptly_every_time() {
    // Snapshots every 20 entries: the restarted node is sent a snapshot, which drops the
    // log tail its unanswered proposal was in.
    let mut c = TestCluster::up_with(3, |o| o.raft.snapshot_logs = 20).await;
    for round in 0..4 {
        let old = c.leader_among(&[1, 2, 3], Duration::from_secs(30)).await;
        c.kill9(old);
        let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != old).collect();
        c.leader_among(&survivors, Duration::from_secs(30)).await;
        // The new leader commits (each survivor's lease may take a keep-alive to come back).
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &survivors {
            while let Err(e) = c.acquire(*n, &format!("round-{round}-node-{n}")).await {
                assert!(Instant::now() < deadline, "no lock after the failover: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for i in 0..40 {
            let key = format!("round-{round}-{i}");
            c.acquire(survivors[i % 2], &key).await.unwrap();
        }
        let sessions = c.log(old).matches("metadata session opened").count();
        let t0 = Instant::now();
        c.restart(old);
        common::wait_until(
            Duration::from_secs(10),
            "the restarted leader to rejoin",
            || c.log(old).matches("metadata session opened").count() > sessions,
        );
        eprintln!(
            "round {round}: leader {old} killed, restarted, session open after {:?}",
            t0.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_nodes_come_up_with_five_voters_and_eleven_learners() {
    let c = TestCluster::up_with(16, |o| {
        o.lun_size = 64 << 20;
        o.ready_timeout = Duration::from_secs(240);
    })
    .await;
    let st = c.client().status().await.unwrap();
    assert_eq!(st.nodes.len(), 16);
    let count = |r: &str| st.nodes.iter().filter(|n| n.role == r).count();
    assert_eq!(count("leader"), 1, "{st:?}");
    assert_eq!(count("voter") + count("leader"), 5, "{st:?}");
    assert_eq!(count("learner"), 11, "{st:?}");
    assert!(st.nodes.iter().all(|n| n.alive && n.path == "direct"));
    // A learner serves linearizable reads and forwards writes.
    let learner = st.nodes.iter().find(|n| n.role == "learner").unwrap().id;
    let t = c.acquire(learner, "from-a-learner").await.unwrap();
    assert_eq!(lock_holder(&c, "from-a-learner").await, Some((learner, t)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_lock_is_exclusive_across_nodes_and_tokens_increase() {
    let c = TestCluster::up(3).await;
    let t1 = c.acquire(1, "vm-disk").await.unwrap();
    let busy = c.acquire(2, "vm-disk").await.unwrap_err();
    assert!(busy.contains("held by another session"), "{busy}");
    let shared = c
        .call(
            3,
            Request::LockAcquire {
                key: "vm-disk".into(),
                exclusive: false,
            },
        )
        .await;
    assert!(matches!(shared, Reply::Lock(Err(_))), "{shared:?}");
    // Re-acquiring by the holder is idempotent.
    assert_eq!(c.acquire(1, "vm-disk").await.unwrap(), t1);
    match c
        .call(
            1,
            Request::LockRelease {
                key: "vm-disk".into(),
            },
        )
        .await
    {
        Reply::Lock(Ok(_)) => {}
        other => panic!("{other:?}"),
    }
    let t2 = c.acquire(2, "vm-disk").await.unwrap();
    assert!(t2 > t1, "fencing tokens must increase: {t1} then {t2}");
    assert_eq!(lock_holder(&c, "vm-disk").await, Some((2, t2)));
}

/// Asserts that `victim` still holds `key` under `token` and that `other` cannot take it.
async fn assert_still_held(
    c: &TestCluster,
    key: &str,
    victim: u64,
    token: u64,
    other: u64,
    why: &str,
) {
    assert_eq!(lock_holder(c, key).await, Some((victim, token)), "{why}");
    assert!(c.acquire(other, key).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_lock_is_freed_after_its_ttl_and_not_before() {
    let mut c = TestCluster::up(3).await;
    let ttl = Duration::from_millis(c.opts.session.ttl_ms);
    let (_, victim, other) = c.leader_and_followers().await;
    let t1 = c.acquire(victim, "held").await.unwrap();
    c.kill9(victim);
    let killed_at = Instant::now();
    // The last keep-alive was at most ttl/4 before the kill: the session lives at
    // least 3/4 ttl more. Check well inside that window that the lock is still held.
    tokio::time::sleep(ttl / 2).await;
    let why = "lock freed before the TTL ran out";
    assert_still_held(&c, "held", victim, t1, other, why).await;
    let deadline = killed_at + ttl * 3;
    loop {
        if lock_holder(&c, "held").await.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "lock not freed within 3 x TTL");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let freed_after = killed_at.elapsed();
    eprintln!("lock of killed node {victim} freed {freed_after:?} after kill -9 (ttl {ttl:?})");
    assert!(freed_after >= ttl / 2);
    let t2 = c.acquire(other, "held").await.unwrap();
    assert!(t2 > t1);
}

/// A restart does not free a crashed node's locks early: writes it issued before the crash may
/// still be queued at the SAN, bound to land within the TTL, not within the restart. The node
/// opens its new session only once the old one has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_nodes_restart_waits_out_its_old_session_and_frees_no_lock_early() {
    let mut c = TestCluster::up(3).await;
    let ttl = Duration::from_millis(c.opts.session.ttl_ms);
    let (_, victim, other) = c.leader_and_followers().await;
    let t1 = c.acquire(victim, "held").await.unwrap();
    c.kill9(victim);
    let killed_at = Instant::now();
    c.restart(victim);
    tokio::time::sleep(ttl / 2).await;
    let why = "the restart freed the crashed node's lock before its TTL ran out";
    assert_still_held(&c, "held", victim, t1, other, why).await;
    cluster::wait_ready(&c.file, ttl * 5).await.unwrap();
    let ready_after = killed_at.elapsed();
    eprintln!("node {victim} restarted and ready {ready_after:?} after kill -9 (ttl {ttl:?})");
    assert!(ready_after >= ttl / 2, "{ready_after:?}");
    assert_eq!(lock_holder(&c, "held").await, None);
    let t2 = c.acquire(other, "held").await.unwrap();
    assert!(t2 > t1);
    // The restarted node works normally under its new session.
    assert!(c.acquire(victim, "mine").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_its_ttl_finds_its_lock_gone_and_token_stale() {
    let c = TestCluster::up(3).await;
    let (_, paused, other) = c.leader_and_followers().await;
    let t1 = c.acquire(paused, "vm").await.unwrap();
    c.signal(paused, libc::SIGSTOP);
    let deadline = Instant::now() + Duration::from_millis(c.opts.session.ttl_ms * 4);
    while lock_holder(&c, "vm").await.is_some() {
        assert!(Instant::now() < deadline, "the paused node kept its lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t2 = c.acquire(other, "vm").await.unwrap();
    assert!(t2 > t1);
    c.signal(paused, libc::SIGCONT);
    // On resuming, the node must not consider its old grant valid.
    match c
        .call(
            paused,
            Request::LockValidate {
                key: "vm".into(),
                token: t1,
            },
        )
        .await
    {
        Reply::Lock(Err(e)) => eprintln!("resumed node {paused} was told: {e}"),
        other => panic!("stale token accepted after resume: {other:?}"),
    }
    // It gets a new session in time, still without the lock.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = c.client().statuses(Duration::from_secs(1)).await;
        let s = st
            .iter()
            .find(|(id, _)| *id == paused)
            .and_then(|(_, s)| s.clone());
        if s.is_some_and(|s| s.session.is_some()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "paused node did not reopen a session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lock_holder(&c, "vm").await, Some((other, t2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_node_keeps_all_committed_state() {
    // Snapshot every 50 entries, so the restart recovers from a snapshot plus the log.
    let mut c = TestCluster::up_with(3, |o| o.raft.snapshot_logs = 50).await;
    let mut last = 0;
    for i in 0..60 {
        let node = 1 + i % 3;
        let key = format!("k{i}");
        last = c.acquire(node, &key).await.unwrap();
        if i % 2 == 0 {
            match c.call(node, Request::LockRelease { key }).await {
                Reply::Lock(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    let client = c.client();
    let QueryReply::Volume(volume) = client.query(Query::Volume).await.unwrap() else {
        panic!()
    };
    let QueryReply::Nodes(nodes) = client.query(Query::Nodes).await.unwrap() else {
        panic!()
    };
    let applied_before = client
        .statuses(Duration::from_secs(2))
        .await
        .into_iter()
        .filter_map(|(_, s)| s.and_then(|s| s.last_applied))
        .max()
        .unwrap();
    assert!(applied_before > 90, "{applied_before}");
    for n in [1, 2, 3] {
        c.kill9(n);
    }
    let restarted = Instant::now();
    for n in [1, 2, 3] {
        c.restart(n);
    }
    cluster::wait_ready(&c.file, Duration::from_secs(60))
        .await
        .unwrap();
    // Every node waited for its crashed process's session to expire, which the new leader
    // did one TTL after its election, not the nodes' fallback (replacing it after 3 TTLs).
    let ready_after = restarted.elapsed();
    let ttl = Duration::from_millis(c.opts.session.ttl_ms);
    eprintln!("all nodes restarted and ready after {ready_after:?} (ttl {ttl:?})");
    assert!(ready_after >= ttl, "{ready_after:?}");
    for n in [1, 2, 3] {
        let log = c.log(n);
        assert!(!log.contains("not seen to expire"), "node {n}:\n{log}");
    }
    let client = c.client();
    let QueryReply::Volume(volume_after) = client.query(Query::Volume).await.unwrap() else {
        panic!()
    };
    assert_eq!(volume, volume_after);
    assert!(volume_after.is_some());
    let QueryReply::Nodes(nodes_after) = client.query(Query::Nodes).await.unwrap() else {
        panic!()
    };
    let addrs = |v: &Vec<csv_core::meta::NodeRecord>| {
        v.iter()
            .map(|n| (n.id, n.rpc_addr.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(addrs(&nodes), addrs(&nodes_after));
    // Sessions are new (a restarted node drops its old session and with it its locks),
    // but everything else committed is there: the fencing-token counter goes on.
    assert!(nodes_after.iter().all(|n| n.session.is_some()));
    let next = c.acquire(3, "after-restart").await.unwrap();
    assert!(
        next > last,
        "fencing tokens went back after a restart: {last} then {next}"
    );
    let applied_after = client
        .statuses(Duration::from_secs(2))
        .await
        .into_iter()
        .filter_map(|(_, s)| s.and_then(|s| s.last_applied))
        .max()
        .unwrap();
    assert!(applied_after > applied_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_and_malformed_rpc_is_refused_without_crashing_the_node() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = TestCluster::up(1).await;
    let addr = c.file.node(1).unwrap().rpc.clone();
    // Garbage.
    for junk in [
        &b"\x00\x01\x02"[..],
        &[0xffu8; 4096][..],
        b"CSVRPC\0\x01\x00\x09xxxxxxxx",
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = s.write_all(junk).await;
        let _ = s.shutdown().await;
        let mut b = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(6), s.read(&mut b)).await;
    }
    // The wrong secret.
    let intruder = lockmgr::rpc::RpcClient::new(
        addr,
        lockmgr::rpc::auth::ClusterKey::from_secret(b"not-the-cluster-secret").unwrap(),
        77,
    );
    assert!(
        intruder
            .call(Request::Status, Duration::from_secs(5))
            .await
            .is_err()
    );
    // Still alive and serving.
    assert!(cluster::pid_alive(c.pid(1)));
    assert!(c.acquire(1, "still-works").await.is_ok());
    let log = c.log(1);
    assert!(
        log.contains("refused RPC peer"),
        "refusals must be logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_lun_is_refused() {
    let c = TestCluster::up(1).await;
    let other_lun = c.path().join("other.img");
    std::fs::File::create(&other_lun)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    csvd::format::format_lun(
        &other_lun.display().to_string(),
        4096,
        csvd::format::Existing::Refuse,
    )
    .await
    .unwrap();
    let nd = c.path().join("intruder");
    std::fs::create_dir_all(&nd).unwrap();
    let port = csv_core::ports::free_port().unwrap();
    let nport = csv_core::ports::free_port().unwrap();
    let cfg = format!(
        "node_id = 9\ndata_dir = \"{}\"\nlun = \"{}\"\nsecret_file = \"{}\"\npeers = [\"{}\"]\n[listen]\nrpc = \"127.0.0.1:{port}\"\nnbd = \"127.0.0.1:{nport}\"\n",
        nd.join("data").display(),
        other_lun.display(),
        c.file.secret_file.display(),
        c.file.node(1).unwrap().rpc
    );
    std::fs::write(nd.join("node.toml"), cfg).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(csvd_bin())
            .arg("--config")
            .arg(nd.join("node.toml"))
            .output(),
    )
    .await
    .expect("csvd with the wrong LUN must exit")
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("wrong LUN"), "stderr: {err}");

    // A LUN that is not a csvd volume at all.
    let blank = c.path().join("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let cfg2 = std::fs::read_to_string(nd.join("node.toml"))
        .unwrap()
        .replace(
            &other_lun.display().to_string(),
            &blank.display().to_string(),
        );
    std::fs::write(nd.join("node.toml"), cfg2).unwrap();
    let out = tokio::process::Command::new(csvd_bin())
        .arg("--config")
        .arg(nd.join("node.toml"))
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.to_lowercase().contains("not a csvd"), "stderr: {err}");
}

#[tokio::test]
async fn a_bad_config_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("node.toml");
    std::fs::write(
        &p,
        "node_id = 0\ndata_dir = \"/tmp\"\nlun = \"x\"\nsecret_file = \"s\"\nbootstrap = true\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(csvd_bin())
        .arg("--config")
        .arg(&p)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node_id"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_voter_is_replaced_by_a_healthy_learner() {
    let mut c = TestCluster::up_with(4, |o| o.raft.voter_replace_after_ms = 2_000).await;
    let st = c.client().status().await.unwrap();
    let voters: Vec<u64> = st
        .nodes
        .iter()
        .filter(|n| n.role == "voter" || n.role == "leader")
        .map(|n| n.id)
        .collect();
    assert_eq!(voters.len(), 3, "{st:?}");
    let learner = st.nodes.iter().find(|n| n.role == "learner").unwrap().id;
    let victim = st.nodes.iter().find(|n| n.role == "voter").unwrap().id;
    c.kill9(victim);
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(40);
    loop {
        let st = c.client().status().await.unwrap();
        let role = |id: u64| st.nodes.iter().find(|n| n.id == id).map(|n| n.role.clone());
        if matches!(role(learner).as_deref(), Some("voter") | Some("leader"))
            && role(victim).as_deref() != Some("voter")
        {
            eprintln!(
                "voter {victim} replaced by learner {learner} after {:?}",
                killed.elapsed()
            );
            break;
        }
        assert!(Instant::now() < deadline, "dead voter not replaced: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The cluster still commits with the new voter set.
    assert!(c.acquire(learner, "after-replacement").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_locks_at_once_and_hands_over_the_voter_seat() {
    let mut c = TestCluster::up_with(4, |o| o.session.ttl_ms = 20_000).await;
    let st = c.client().status().await.unwrap();
    let learner = st.nodes.iter().find(|n| n.role == "learner").unwrap().id;
    let leaving = st.nodes.iter().find(|n| n.role == "voter").unwrap().id;
    c.acquire(leaving, "released-on-exit").await.unwrap();
    let t = Instant::now();
    c.stop(leaving, libc::SIGTERM, Duration::from_secs(15));
    eprintln!("node {leaving} stopped gracefully in {:?}", t.elapsed());
    // Its lock is free right away, not one 20 s TTL later.
    assert_eq!(lock_holder(&c, "released-on-exit").await, None);
    let st = c.client().status().await.unwrap();
    let role = |id: u64| st.nodes.iter().find(|n| n.id == id).map(|n| n.role.clone());
    assert!(
        matches!(role(learner).as_deref(), Some("voter") | Some("leader")),
        "the voter seat was not handed to the learner: {st:?}"
    );
    assert_ne!(role(leaving).as_deref(), Some("voter"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_nbdkit_san_paths_comes_up_and_down_cleanly() {
    let mut c = TestCluster::up_with(3, |o| o.san = cluster::SanMode::Nbdkit).await;
    for n in &c.file.nodes {
        assert!(n.san.starts_with("nbd+unix://"), "{}", n.san);
        assert!(cluster::pid_alive(n.san_pid.unwrap()));
    }
    let t = c.acquire(2, "over-nbd").await.unwrap();
    assert_eq!(lock_holder(&c, "over-nbd").await, Some((2, t)));
    let pids: Vec<u32> = c
        .file
        .nodes
        .iter()
        .flat_map(|n| [n.pid, n.san_pid.unwrap()])
        .collect();
    let dir = c.path().to_path_buf();
    cluster::down(&dir, &mut c.children).await.unwrap();
    c.children.reap();
    for p in pids {
        assert!(
            !cluster::pid_alive(p),
            "process {p} still running after cluster down"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_was_down_catches_up_from_a_snapshot() {
    let mut c = TestCluster::up_with(3, |o| o.raft.snapshot_logs = 20).await;
    let leader = c.leader_among(&[1, 2, 3], Duration::from_secs(10)).await;
    let down = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
    c.kill9(down);
    let up = [1, 2, 3].into_iter().find(|n| *n != down).unwrap();
    // Far more entries than the snapshot interval: the log it missed is purged.
    for i in 0..80 {
        let key = format!("while-down-{i}");
        c.acquire(up, &key).await.unwrap();
        match c.call(up, Request::LockRelease { key }).await {
            Reply::Lock(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    let target = c
        .client()
        .statuses(Duration::from_secs(2))
        .await
        .into_iter()
        .filter_map(|(_, s)| s.and_then(|s| s.last_applied))
        .max()
        .unwrap();
    c.restart(down);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = c.client().statuses(Duration::from_secs(1)).await;
        let applied = st
            .iter()
            .find(|(id, _)| *id == down)
            .and_then(|(_, s)| s.as_ref().and_then(|s| s.last_applied));
        if applied.is_some_and(|a| a >= target) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {down} did not catch up: {applied:?} < {target}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It serves linearizable reads of state it only got through the snapshot.
    let Reply::Query(Ok(QueryReply::Locks(locks))) =
        c.call(down, Request::Query(Query::Locks)).await
    else {
        panic!("node {down} did not answer the query")
    };
    assert!(locks.iter().all(|l| !l.key.starts_with("while-down-")));
    // It takes locks once its crashed process's session has expired and it opened a new one.
    cluster::wait_ready(&c.file, Duration::from_secs(30))
        .await
        .unwrap();
    let t = c.acquire(down, "after-catch-up").await.unwrap();
    assert!(t > 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_follower_ride_out_a_paused_leader() {
    let c = TestCluster::up(3).await;
    let (leader, follower, _) = c.leader_and_followers().await;
    c.acquire(follower, "warm-up").await.unwrap();
    c.signal(leader, libc::SIGSTOP);
    let t = Instant::now();
    // Forwarded to the paused leader first: unanswered, retried on the new leader,
    // applied exactly once.
    let r = c.acquire(follower, "during-pause").await;
    let took = t.elapsed();
    c.signal(leader, libc::SIGCONT);
    let token = r.expect("a write must succeed while a quorum is up");
    eprintln!("write during a paused leader took {took:?}");
    assert!(took < Duration::from_secs(8), "write stalled {took:?}");
    // Exactly once: the lock is held once, by the follower, with that token.
    assert_eq!(
        lock_holder(&c, "during-pause").await,
        Some((follower, token))
    );
    // Once resumed, the old leader follows the new one.
    c.leader_among(&[1, 2, 3], Duration::from_secs(15)).await;
}
