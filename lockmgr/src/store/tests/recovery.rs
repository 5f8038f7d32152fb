//! Restart and crash recovery: what was made durable comes back after reopening the store,
//! and openraft's startup re-apply rebuilds the state from snapshot + log.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::storage::{RaftLogStorage, RaftStateMachine, StorageHelper};
use openraft::{RaftLogReader, RaftSnapshotBuilder, Vote};

use super::support::{Router, Tally, cmd, log_id, membership, normal, open_eventually, tally_of};
use crate::store::open;
use crate::types::RaftNode;

/// Entries 0..=9 (openraft's logs start at 0): a membership entry, then `cmd(i)` at index i.
fn ten_entries() -> Vec<openraft::Entry<crate::types::TypeConfig>> {
    let mut v = vec![membership(1, 0, &[1, 2, 3])];
    v.extend((1..=9).map(|i| normal(1, i, i)));
    v
}

#[tokio::test]
async fn reopen_restores_vote_log_committed_snapshot_and_reapplies_committed_entries() {
    let dir = tempfile::tempdir().unwrap();
    let entries = ten_entries();
    let built_meta = {
        let (mut log, mut sm) = open::<Tally>(dir.path()).unwrap();
        log.append_durable(entries.clone()).await.unwrap();
        log.save_vote(&Vote::new(4, 2)).await.unwrap();
        log.save_committed(Some(log_id(1, 7))).await.unwrap();
        sm.apply(entries[..5].to_vec()).await.unwrap();
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        sm.apply(entries[5..8].to_vec()).await.unwrap();
        assert_eq!(*sm.state().read().unwrap(), tally_of(1..=7));
        snap.meta
    };

    let (mut log, mut sm) = open::<Tally>(dir.path()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(4, 2)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 7)));
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
    let st = log.get_log_state().await.unwrap();
    assert_eq!(
        (st.last_purged_log_id, st.last_log_id),
        (None, Some(log_id(1, 9)))
    );

    // The snapshot (applied up to 4) is loaded, nothing after it.
    assert_eq!(sm.last_applied(), Some(log_id(1, 4)));
    assert_eq!(*sm.state().read().unwrap(), tally_of(1..=4));
    let (applied, mem) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 4)));
    assert_eq!(mem.log_id(), &Some(log_id(1, 0)));
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built_meta);

    // openraft's startup sequence re-applies (4, 7] from the log.
    let applied_rx = sm.applied();
    let state = sm.state();
    StorageHelper::new(&mut log, &mut sm)
        .get_initial_state()
        .await
        .unwrap();
    assert_eq!(*state.read().unwrap(), tally_of(1..=7));
    assert_eq!(*applied_rx.borrow(), Some(log_id(1, 7)));
}

#[tokio::test]
async fn truncate_and_purge_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, mut sm) = open::<Tally>(dir.path()).unwrap();
        log.append_durable(ten_entries()).await.unwrap();
        sm.apply(ten_entries()[..4].to_vec()).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        log.purge(log_id(1, 3)).await.unwrap();
        log.truncate(log_id(1, 8)).await.unwrap();
    }
    let (mut log, _sm) = open::<Tally>(dir.path()).unwrap();
    let st = log.get_log_state().await.unwrap();
    assert_eq!(
        (st.last_purged_log_id, st.last_log_id),
        (Some(log_id(1, 3)), Some(log_id(1, 7)))
    );
    let got: Vec<u64> = log
        .try_get_log_entries(..)
        .await
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect();
    assert_eq!(got, vec![4, 5, 6, 7]);
}

#[tokio::test]
async fn open_refuses_a_log_purged_past_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = open::<Tally>(dir.path()).unwrap();
        log.append_durable(ten_entries()).await.unwrap();
        log.purge(log_id(1, 3)).await.unwrap();
    }
    let err = open::<Tally>(dir.path()).unwrap_err();
    assert!(
        matches!(err, crate::store::StoreError::PurgedPastSnapshot { .. }),
        "{err:?}"
    );
}

const CRASH_DIR_ENV: &str = "CSVD_STORE_CRASH_DIR";

/// Child half of `process_exit_without_close_keeps_fsynced_writes`: writes, then exits the
/// process without closing the databases (no destructors run). Only runs when spawned.
#[tokio::test]
#[ignore = "run by process_exit_without_close_keeps_fsynced_writes in a child process"]
async fn crash_child_writes_then_exits() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let (mut log, mut sm) = open::<Tally>(std::path::Path::new(&dir)).unwrap();
    let entries = ten_entries();
    log.append_durable(entries[..6].to_vec()).await.unwrap();
    log.save_vote(&Vote::new(7, 3)).await.unwrap();
    log.save_committed(Some(log_id(1, 5))).await.unwrap();
    sm.apply(entries[..4].to_vec()).await.unwrap();
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    // Made durable by this fsync'd append, although it was written without fsync.
    log.append_durable(entries[6..].to_vec()).await.unwrap();
    std::process::exit(0);
}

#[test]
fn process_exit_without_close_keeps_fsynced_writes() {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "store::tests::recovery::crash_child_writes_then_exits",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "child failed: {status}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut log, mut sm) = open::<Tally>(dir.path()).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(7, 3)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 5)));
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), ten_entries());
        assert_eq!(sm.last_applied(), Some(log_id(1, 3)));
        let state = sm.state();
        StorageHelper::new(&mut log, &mut sm)
            .get_initial_state()
            .await
            .unwrap();
        assert_eq!(*state.read().unwrap(), tally_of(1..=5));
    });
}

/// A single-node cluster restarted from its directory recovers everything it committed:
/// the snapshot, then the committed entries after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_restart_recovers_state_from_snapshot_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::default();
    let wait = Some(Duration::from_secs(20));
    let (raft, _) = router.start(1, dir.path()).await;
    raft.initialize(BTreeMap::from([(
        1,
        RaftNode {
            rpc_addr: "n1".into(),
        },
    )]))
    .await
    .unwrap();
    raft.wait(wait).current_leader(1, "leader").await.unwrap();
    let mut last = 0;
    for n in 1..=30 {
        last = raft.client_write(cmd(n)).await.unwrap().log_id.index;
    }
    // The state machine has applied `last`; openraft's metrics may not show it yet.
    raft.trigger().snapshot().await.unwrap();
    raft.wait(wait)
        .metrics(|m| m.snapshot.is_some_and(|s| s.index == last), "snapshot")
        .await
        .unwrap();
    for n in 31..=50 {
        last = raft.client_write(cmd(n)).await.unwrap().log_id.index;
    }
    router.remove(1);
    raft.shutdown().await.unwrap();
    drop(raft);

    let (log, sm) = open_eventually(dir.path()).await;
    assert_eq!(
        *sm.state().read().unwrap(),
        tally_of(1..=30),
        "snapshot loaded"
    );
    let state = sm.state();
    let raft =
        crate::types::Raft::new(1, super::support::raft_config(), router.factory(1), log, sm)
            .await
            .unwrap();
    router.add(1, raft.clone());
    raft.wait(wait)
        .applied_index_at_least(Some(last), "re-applied")
        .await
        .unwrap();
    assert_eq!(*state.read().unwrap(), tally_of(1..=50));
    raft.wait(wait)
        .current_leader(1, "re-elected")
        .await
        .unwrap();
    let resp = raft.client_write(cmd(51)).await.unwrap();
    assert_eq!(resp.data, crate::types::Response::Session(51));
    raft.shutdown().await.unwrap();
}
