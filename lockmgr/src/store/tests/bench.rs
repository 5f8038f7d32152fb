//! Throughput of fsync'd appends (ignored by default; run with
//! `cargo test -p lockmgr --release store::tests::bench -- --ignored --nocapture`).

use std::collections::BTreeMap;
use std::time::Instant;

use openraft::storage::RaftLogStorage;

use super::support::{Router, Tally, cmd, log_id, membership, normal};
use crate::store::open;
use crate::types::RaftNode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn append_throughput_single_entry_and_single_node_raft() {
    const N: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let (log, _sm) = open::<Tally>(dir.path()).unwrap();
    log.append_durable(vec![membership(1, 0, &[1])])
        .await
        .unwrap();
    let t = Instant::now();
    for i in 1..=N {
        log.append_durable(vec![normal(1, i, i)]).await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "store append_durable, 1 entry per fsync'd commit: {N} in {secs:.3} s = {:.0} entries/s",
        N as f64 / secs
    );

    let t = Instant::now();
    for b in 0..N / 100 {
        let batch = (1..=100).map(|k| normal(1, N + b * 100 + k, k)).collect();
        log.append_durable(batch).await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "store append_durable, 100 entries per commit: {N} in {secs:.3} s = {:.0} entries/s",
        N as f64 / secs
    );

    // What RaftCore does per single-entry write on a single node: append, then save_committed.
    let mut log = log;
    let base = N + N;
    let t = Instant::now();
    for i in 1..=N {
        log.append_durable(vec![normal(1, base + i, i)])
            .await
            .unwrap();
        log.save_committed(Some(log_id(1, base + i))).await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "store append_durable + save_committed: {N} in {secs:.3} s = {:.0} entries/s",
        N as f64 / secs
    );

    let dir = tempfile::tempdir().unwrap();
    let router = Router::default();
    let (raft, _) = router.start(1, dir.path()).await;
    raft.initialize(BTreeMap::from([(
        1,
        RaftNode {
            rpc_addr: "n1".into(),
        },
    )]))
    .await
    .unwrap();
    raft.wait(None).current_leader(1, "leader").await.unwrap();
    let t = Instant::now();
    for n in 1..=N {
        raft.client_write(cmd(n)).await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "single-node raft, sequential client_write: {N} in {secs:.3} s = {:.0} writes/s",
        N as f64 / secs
    );
    raft.shutdown().await.unwrap();
}
