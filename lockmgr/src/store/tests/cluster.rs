//! A 3-node openraft cluster in one process, each node on its own redb store: replication,
//! snapshot + purge, a node restarted from its directory catching up by InstallSnapshot, and
//! a new learner catching up by InstallSnapshot.

use std::collections::BTreeMap;
use std::time::Duration;

use super::support::{Router, cmd, open_eventually, tally_of};
use crate::types::{Raft, RaftNode, Response};

const WAIT: Option<Duration> = Some(Duration::from_secs(30));

fn node(id: u64) -> RaftNode {
    RaftNode {
        rpc_addr: format!("n{id}"),
    }
}

/// Snapshots `raft` at (or after) its applied index and purges the log up to the snapshot;
/// returns the snapshot's index.
async fn snapshot_and_purge(raft: &Raft) -> u64 {
    let applied = raft.metrics().borrow().last_applied.unwrap().index;
    raft.trigger().snapshot().await.unwrap();
    let m = raft
        .wait(WAIT)
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= applied),
            "snapshot built",
        )
        .await
        .unwrap();
    let at = m.snapshot.unwrap().index;
    raft.trigger().purge_log(at).await.unwrap();
    raft.wait(WAIT)
        .metrics(|m| m.purged.is_some_and(|p| p.index >= at), "log purged")
        .await
        .unwrap();
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_snapshot_restart_and_add_learner() {
    let dirs: Vec<_> = (0..=4).map(|_| tempfile::tempdir().unwrap()).collect();
    let router = Router::default();
    let mut rafts = BTreeMap::new();
    let mut states = BTreeMap::new();
    for id in 1..=3 {
        let (raft, state) = router.start(id, dirs[id as usize].path()).await;
        rafts.insert(id, raft);
        states.insert(id, state);
    }
    let leader = rafts[&1].clone();
    leader
        .initialize(BTreeMap::from([(1, node(1)), (2, node(2)), (3, node(3))]))
        .await
        .unwrap();
    leader
        .wait(WAIT)
        .current_leader(1, "node 1 leads")
        .await
        .unwrap();

    // 200 commands; each answer comes from the state machine, in log order.
    let mut last = 0;
    for n in 1..=200 {
        let resp = leader.client_write(cmd(n)).await.unwrap();
        assert_eq!(resp.data, Response::Session(n));
        last = resp.log_id.index;
    }
    for (id, raft) in &rafts {
        raft.wait(WAIT)
            .applied_index_at_least(Some(last), format!("node {id} applied"))
            .await
            .unwrap();
        assert_eq!(*states[id].read().unwrap(), tally_of(1..=200), "node {id}");
    }
    for raft in rafts.values() {
        assert!(snapshot_and_purge(raft).await >= last);
    }

    // Node 3 goes down; the others commit 50 more and purge past everything node 3 has.
    router.remove(3);
    let raft3 = rafts.remove(&3).unwrap();
    raft3.shutdown().await.unwrap();
    drop(raft3);
    states.remove(&3);
    for n in 201..=250 {
        leader.client_write(cmd(n)).await.unwrap();
    }
    let last2 = snapshot_and_purge(&leader).await;
    assert!(last2 > last);

    // Node 3 restarts from its directory: its own snapshot comes back first...
    let (log, sm) = open_eventually(dirs[3].path()).await;
    let state3 = sm.state();
    assert_eq!(
        *state3.read().unwrap(),
        tally_of(1..=200),
        "node 3 after reopen"
    );
    let raft3 = Raft::new(3, super::support::raft_config(), router.factory(3), log, sm)
        .await
        .unwrap();
    assert_eq!(
        *state3.read().unwrap(),
        tally_of(1..=200),
        "node 3 after startup"
    );
    // ...then the leader, whose log no longer reaches back that far, sends its snapshot.
    router.add(3, raft3.clone());
    raft3
        .wait(WAIT)
        .applied_index_at_least(Some(last2), "node 3 caught up")
        .await
        .unwrap();
    assert_eq!(*state3.read().unwrap(), tally_of(1..=250));
    let snap3 = raft3.metrics().borrow().snapshot;
    assert!(
        snap3.is_some_and(|s| s.index >= last2),
        "node 3 installed a snapshot: {snap3:?}"
    );

    // A new node joins as a learner and catches up by InstallSnapshot.
    let (raft4, state4) = router.start(4, dirs[4].path()).await;
    leader.add_learner(4, node(4), true).await.unwrap();
    raft4
        .wait(WAIT)
        .applied_index_at_least(Some(last2), "node 4 caught up")
        .await
        .unwrap();
    assert_eq!(*state4.read().unwrap(), tally_of(1..=250));
    assert!(
        raft4
            .metrics()
            .borrow()
            .snapshot
            .is_some_and(|s| s.index >= last2)
    );

    // Writes keep flowing to every node, the learner included.
    let resp = leader.client_write(cmd(251)).await.unwrap();
    assert_eq!(resp.data, Response::Session(251));
    let last3 = resp.log_id.index;
    for (id, raft) in rafts.iter().chain([(&3, &raft3), (&4, &raft4)]) {
        raft.wait(WAIT)
            .applied_index_at_least(Some(last3), format!("node {id} applied 251"))
            .await
            .unwrap();
    }
    assert_eq!(*state3.read().unwrap(), tally_of(1..=251));
    assert_eq!(*state4.read().unwrap(), tally_of(1..=251));

    // The learner persisted the installed snapshot: reopening its store alone restores it.
    router.remove(4);
    raft4.shutdown().await.unwrap();
    drop(raft4);
    let (_log, sm4) = open_eventually(dirs[4].path()).await;
    assert!(sm4.last_applied().is_some_and(|l| l.index >= last2));
    assert_eq!(*sm4.state().read().unwrap(), tally_of(1..=250));

    for raft in rafts.values().chain([&raft3]) {
        raft.shutdown().await.unwrap();
    }
}
