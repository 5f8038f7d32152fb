//! The chaos harness as the integration tests use it: the checkers catch injected bugs,
//! short chaos runs on a real 3-node cluster are valid, and `csvctl fsck` works offline
//! without touching the store.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use csvd::chaos::checker::{self, Verdict};
use csvd::chaos::history::{
    FinalState, History, NodeDigest, NodeFsck, NodePath, OpKind, OpRecord, Outcome, RunHeader,
};
use csvd::chaos::report::Report;
use csvd::chaos::schedule::{self, FaultKind, ScheduleShape};
use csvd::chaos::workload::WorkloadKind;
use csvd::chaos::{self, ChaosError, ChaosOptions};
use proptest::prelude::*;

// ---- building histories by hand --------------------------------------------------------

fn op(id: u64, worker: u32, node: u64, kind: OpKind, t: (f64, f64), outcome: Outcome) -> OpRecord {
    OpRecord {
        id,
        workload: "nbd".into(),
        worker,
        node,
        kind,
        invoke_s: t.0,
        return_s: t.1,
        outcome,
        detail: String::new(),
    }
}

fn write(id: u64, worker: u32, block: u64, t: (f64, f64), outcome: Outcome) -> OpRecord {
    write_to("", 0, id, worker, block, t, outcome)
}

/// A block write to `target` through connection (or open) `conn`.
fn write_to(
    target: &str,
    conn: u64,
    id: u64,
    worker: u32,
    block: u64,
    t: (f64, f64),
    outcome: Outcome,
) -> OpRecord {
    let kind = OpKind::BlockWrite {
        target: target.into(),
        block,
        op_id: id,
        crc: 0,
        fua: false,
        conn,
    };
    op(id, worker, 1, kind, t, outcome)
}

fn flush(id: u64, worker: u32, t: (f64, f64)) -> OpRecord {
    flush_of("", 0, id, worker, t)
}

fn flush_of(target: &str, conn: u64, id: u64, worker: u32, t: (f64, f64)) -> OpRecord {
    let kind = OpKind::Flush {
        target: target.into(),
        conn,
    };
    op(id, worker, 1, kind, t, Outcome::Ok)
}

fn read(id: u64, block: u64, observed: u64, t: (f64, f64), final_check: bool) -> OpRecord {
    read_of("", id, block, observed, t, final_check)
}

fn read_of(
    target: &str,
    id: u64,
    block: u64,
    observed: u64,
    t: (f64, f64),
    final_check: bool,
) -> OpRecord {
    let kind = OpKind::BlockRead {
        target: target.into(),
        block,
        observed,
        crc_ok: true,
        final_check,
    };
    op(id, 9, 2, kind, t, Outcome::Ok)
}

fn unlink(id: u64, target: &str, t: (f64, f64), outcome: Outcome) -> OpRecord {
    let kind = OpKind::Namespace {
        action: "unlink".into(),
        name: target.into(),
    };
    let mut o = op(id, 1, 1, kind, t, outcome);
    o.workload = "fuse".into();
    o
}

fn acquire(
    id: u64,
    node: u64,
    key: &str,
    token: Option<u64>,
    t: (f64, f64),
    o: Outcome,
) -> OpRecord {
    let kind = OpKind::LockAcquire {
        key: key.into(),
        token,
    };
    op(id, node as u32, node, kind, t, o)
}

fn validate(id: u64, node: u64, key: &str, token: u64, t: (f64, f64), o: Outcome) -> OpRecord {
    let kind = OpKind::LockValidate {
        key: key.into(),
        token,
    };
    op(id, node as u32, node, kind, t, o)
}

fn assert_caught(v: &Verdict, what: &str) {
    assert!(!v.valid, "the checker missed {what}: {}", v.detail);
}

fn assert_clean(v: &Verdict) {
    assert!(v.valid, "false alarm: {}", v.detail);
}

// ---- injected bugs ------------------------------------------------------------------------

#[test]
fn a_dropped_write_is_caught_and_a_kept_one_is_not() {
    let base = vec![
        write(1, 1, 7, (0.0, 0.1), Outcome::Ok),
        flush(2, 1, (0.1, 0.2)),
        write(3, 1, 7, (0.3, 0.4), Outcome::Ok),
        flush(4, 1, (0.4, 0.5)),
    ];
    let mut good = base.clone();
    good.push(read(5, 7, 3, (5.0, 5.1), true));
    assert_clean(&checker::no_lost_write(&good));

    // The disk lost op 3: the read-back after healing finds op 1.
    let mut dropped = base.clone();
    dropped.push(read(5, 7, 1, (5.0, 5.1), true));
    assert_caught(&checker::no_lost_write(&dropped), "a dropped write");

    // The block came back blank.
    let mut blank = base.clone();
    blank.push(read(5, 7, 0, (5.0, 5.1), true));
    assert_caught(
        &checker::no_lost_write(&blank),
        "a block that lost every write",
    );

    // A written block that nobody read back is not "verified".
    assert_caught(&checker::no_lost_write(&base), "an unverified block");

    // An indeterminate write may land late: observing it is legal.
    let mut maybe = base.clone();
    maybe.push(write(6, 2, 7, (0.6, 3.0), Outcome::Indeterminate));
    maybe.push(read(7, 7, 6, (5.0, 5.1), true));
    assert_clean(&checker::no_lost_write(&maybe));

    // A write that certainly failed must never be seen.
    let mut failed = base.clone();
    failed.push(write(6, 2, 7, (0.6, 0.7), Outcome::Failed));
    failed.push(read(7, 7, 6, (5.0, 5.1), true));
    assert_caught(
        &checker::no_lost_write(&failed),
        "a failed write that landed",
    );
}

#[test]
fn a_stale_read_after_a_flush_is_caught() {
    let base = vec![
        write(1, 1, 3, (0.0, 0.1), Outcome::Ok),
        flush(2, 1, (0.1, 0.2)),
        write(3, 1, 3, (0.3, 0.4), Outcome::Ok),
    ];
    // Before op 3 is flushed another node may still see op 1.
    let mut unflushed = base.clone();
    unflushed.push(read(4, 3, 1, (0.5, 0.6), false));
    assert_clean(&checker::no_stale_read(&unflushed));

    // After the flush it may not.
    let mut stale = base.clone();
    stale.push(flush(4, 1, (0.4, 0.5)));
    stale.push(read(5, 3, 1, (0.6, 0.7), false));
    assert_caught(
        &checker::no_stale_read(&stale),
        "a stale read after a flush",
    );

    let mut fresh = base.clone();
    fresh.push(flush(4, 1, (0.4, 0.5)));
    fresh.push(read(5, 3, 3, (0.6, 0.7), false));
    assert_clean(&checker::no_stale_read(&fresh));

    // A read concurrent with the flush may see either.
    let mut concurrent = base.clone();
    concurrent.push(flush(4, 1, (0.4, 0.8)));
    concurrent.push(read(5, 3, 1, (0.6, 0.7), false));
    assert_clean(&checker::no_stale_read(&concurrent));

    // Corrupt, phantom and misdirected data.
    let mut corrupt = fresh.clone();
    corrupt.push(op(
        6,
        9,
        2,
        OpKind::BlockRead {
            target: String::new(),
            block: 3,
            observed: 3,
            crc_ok: false,
            final_check: false,
        },
        (0.9, 1.0),
        Outcome::Ok,
    ));
    assert_caught(&checker::no_stale_read(&corrupt), "a corrupt block");
    let mut phantom = fresh.clone();
    phantom.push(read(6, 3, 99, (0.9, 1.0), false));
    assert_caught(&checker::no_stale_read(&phantom), "phantom data");
    let mut misdirected = fresh.clone();
    misdirected.push(write(7, 1, 4, (0.9, 1.0), Outcome::Ok));
    misdirected.push(read(8, 3, 7, (1.1, 1.2), false));
    assert_caught(&checker::no_stale_read(&misdirected), "misdirected data");
}

/// The nbd workload's shapes: an export (target) written through one connection, whose
/// writes are refused after a migration, then through the new owner's connection.
#[test]
fn nbd_handoff_histories_catch_refused_writes_that_land_and_scope_flushes_by_connection() {
    let e = "chaos-nbd-1/w0.img";
    let base = vec![
        write_to(e, 1, 1, 0, 4, (0.0, 0.1), Outcome::Ok),
        flush_of(e, 1, 2, 0, (0.1, 0.2)),
        // Migrated: the old connection's write is refused, its flush still answers.
        write_to(e, 1, 3, 0, 4, (0.3, 0.4), Outcome::Failed),
        flush_of(e, 1, 4, 0, (0.4, 0.5)),
        // The new owner's connection.
        write_to(e, 2, 5, 0, 4, (0.6, 0.7), Outcome::Ok),
        flush_of(e, 2, 6, 0, (0.7, 0.8)),
    ];
    let mut good = base.clone();
    good.push(read_of(e, 7, 4, 5, (1.0, 1.1), false));
    good.push(read_of(e, 8, 4, 5, (5.0, 5.1), true));
    assert_clean(&checker::no_stale_read(&good));
    assert_clean(&checker::no_lost_write(&good));

    // The refused write shows up later: caught, during the run and after healing.
    let mut zombie = base.clone();
    zombie.push(read_of(e, 7, 4, 3, (1.0, 1.1), false));
    zombie.push(read_of(e, 8, 4, 3, (5.0, 5.1), true));
    assert_caught(
        &checker::no_stale_read(&zombie),
        "a refused write read back",
    );
    assert_caught(
        &checker::no_lost_write(&zombie),
        "a refused write that landed",
    );

    // Op 5 was flushed on its connection: the old data after it is lost.
    let mut lost = base.clone();
    lost.push(read_of(e, 8, 4, 1, (5.0, 5.1), true));
    assert_caught(
        &checker::no_lost_write(&lost),
        "a write lost across the handoff",
    );

    // A write acknowledged on a connection that then died unflushed is not made durable
    // by a flush on the next connection: losing it is allowed.
    let crash = vec![
        write_to(e, 1, 1, 0, 4, (0.0, 0.1), Outcome::Ok),
        flush_of(e, 1, 2, 0, (0.1, 0.2)),
        write_to(e, 1, 3, 0, 4, (0.3, 0.4), Outcome::Ok),
        flush_of(e, 2, 4, 0, (0.6, 0.7)),
        read_of(e, 5, 4, 1, (5.0, 5.1), true),
    ];
    assert_clean(&checker::no_lost_write(&crash));

    // Registers are per export: block 4 of another export is another register, and data
    // of one export seen in the other is misdirected.
    let f = "chaos-nbd-1/w1.img";
    let mut two = good.clone();
    two.push(write_to(f, 1, 9, 1, 4, (0.2, 0.3), Outcome::Ok));
    two.push(flush_of(f, 1, 10, 1, (0.3, 0.4)));
    two.push(read_of(f, 11, 4, 9, (5.0, 5.1), true));
    assert_clean(&checker::no_lost_write(&two));
    let mut crossed = two.clone();
    crossed.push(read_of(e, 12, 4, 9, (5.2, 5.3), false));
    assert_caught(&checker::no_stale_read(&crossed), "another export's data");
    let mut unread = good.clone();
    unread.push(write_to(f, 1, 9, 1, 4, (0.2, 0.3), Outcome::Ok));
    unread.push(flush_of(f, 1, 10, 1, (0.3, 0.4)));
    assert_caught(
        &checker::no_lost_write(&unread),
        "an export never read back",
    );
}

/// The fuse workload's shapes: each file a target, each open a connection, `fsync`
/// durable for that file only, removed files exempt from the read-back.
#[test]
fn fuse_histories_scope_fsync_to_the_file_and_exempt_only_removed_files() {
    let (a, b) = ("chaos-fuse-1/w0-1", "chaos-fuse-1/w0-2");
    let base = vec![
        write_to(a, 1, 1, 0, 0, (0.0, 0.1), Outcome::Ok),
        flush_of(a, 1, 2, 0, (0.1, 0.2)),
        write_to(b, 2, 3, 0, 0, (0.3, 0.4), Outcome::Ok),
        // An fsync of file a through a later open does not cover file b.
        flush_of(a, 2, 4, 0, (0.4, 0.5)),
    ];
    let mut ok = base.clone();
    ok.push(read_of(a, 5, 0, 1, (0.6, 0.7), false));
    ok.push(read_of(b, 6, 0, 0, (0.6, 0.7), false));
    ok.push(read_of(a, 7, 0, 1, (5.0, 5.1), true));
    assert_clean(&checker::no_stale_read(&ok));
    assert_clean(&checker::no_lost_write(&ok));

    // Another node reads file a after its fsync and close and sees nothing.
    let mut stale = base.clone();
    stale.push(read_of(a, 5, 0, 0, (0.6, 0.7), false));
    assert_caught(
        &checker::no_stale_read(&stale),
        "a stale read of an fsynced file",
    );

    // File a removed: no read-back needed; kept but never read back: caught.
    let mut removed = base.clone();
    removed.push(unlink(5, a, (1.0, 1.1), Outcome::Ok));
    assert_clean(&checker::no_lost_write(&removed));
    let mut kept = base.clone();
    kept.push(unlink(5, a, (1.0, 1.1), Outcome::Failed));
    assert_caught(
        &checker::no_lost_write(&kept),
        "a kept file never read back",
    );
    // An unlink whose outcome is unknown may have removed it.
    let mut maybe = base.clone();
    maybe.push(unlink(5, a, (1.0, 1.1), Outcome::Indeterminate));
    assert_clean(&checker::no_lost_write(&maybe));
}

#[test]
fn two_holders_of_an_exclusive_lock_are_caught() {
    // Node 1 holds token 5 during [1.0, 2.0] (acquired, then validated); node 2 is
    // granted token 6 at 1.5 and validates at 2.5: both held it at 1.5-2.0.
    let two = vec![
        acquire(1, 1, "data:9", Some(5), (0.9, 1.0), Outcome::Ok),
        acquire(2, 2, "data:9", Some(6), (1.4, 1.5), Outcome::Ok),
        validate(3, 1, "data:9", 5, (2.0, 2.1), Outcome::Ok),
        validate(4, 2, "data:9", 6, (2.5, 2.6), Outcome::Ok),
    ];
    assert_caught(&checker::exclusive_lock(&two), "two writers");

    // Node 1's session expired: its validation failed, so node 2's grant is legal.
    let mut expired = two.clone();
    expired[2].outcome = Outcome::Failed;
    assert_clean(&checker::exclusive_lock(&expired));

    // An indeterminate validation proves nothing either way.
    let mut unknown = two.clone();
    unknown[2].outcome = Outcome::Indeterminate;
    assert_clean(&checker::exclusive_lock(&unknown));

    // One grant reported to two different nodes.
    let shared = vec![
        acquire(1, 1, "data:9", Some(5), (0.9, 1.0), Outcome::Ok),
        acquire(2, 2, "data:9", Some(5), (1.4, 1.5), Outcome::Ok),
    ];
    assert_caught(
        &checker::exclusive_lock(&shared),
        "one token for two sessions",
    );
    // Different keys never conflict.
    let mut other_key = two.clone();
    for o in other_key.iter_mut().filter(|o| o.node == 2) {
        if let OpKind::LockAcquire { key, .. } | OpKind::LockValidate { key, .. } = &mut o.kind {
            *key = "data:10".into();
        }
    }
    assert_clean(&checker::exclusive_lock(&other_key));
}

#[test]
fn fencing_tokens_that_go_back_are_caught() {
    let backwards = vec![
        acquire(1, 1, "a", Some(7), (0.0, 1.0), Outcome::Ok),
        acquire(2, 2, "b", Some(6), (2.0, 2.1), Outcome::Ok),
    ];
    assert_caught(&checker::fencing(&backwards), "a token going back");
    let forwards = vec![
        acquire(1, 1, "a", Some(6), (0.0, 1.0), Outcome::Ok),
        acquire(2, 2, "b", Some(7), (2.0, 2.1), Outcome::Ok),
        // The same session re-acquiring gets the same token back.
        acquire(3, 2, "b", Some(7), (2.2, 2.3), Outcome::Ok),
    ];
    assert_clean(&checker::fencing(&forwards));
    // A session that still holds a lock gets its old token back when it acquires it again:
    // legal when an earlier indeterminate acquire may have made that grant.
    let reacquire = vec![
        acquire(1, 2, "b", None, (0.5, 0.9), Outcome::Indeterminate),
        acquire(2, 1, "a", Some(7), (1.0, 1.1), Outcome::Ok),
        acquire(3, 2, "b", Some(5), (2.0, 2.1), Outcome::Ok),
    ];
    assert_clean(&checker::fencing(&reacquire));
    let mut no_earlier = reacquire.clone();
    no_earlier[0].outcome = Outcome::Failed;
    assert_caught(
        &checker::fencing(&no_earlier),
        "an old token without an earlier grant",
    );

    let fenced = |id, token, t| {
        op(
            id,
            1,
            1,
            OpKind::FencedWrite {
                ino: 4,
                token,
                file_block: 0,
            },
            t,
            Outcome::Ok,
        )
    };
    // A stale-token write accepted after a newer one: a zombie writer got through.
    let zombie = vec![fenced(1, 9, (0.0, 1.0)), fenced(2, 8, (2.0, 2.1))];
    assert_caught(&checker::fencing(&zombie), "a stale-epoch write accepted");
    let ordered = vec![
        fenced(1, 8, (0.0, 1.0)),
        fenced(2, 9, (2.0, 2.1)),
        fenced(3, 9, (3.0, 3.1)),
    ];
    assert_clean(&checker::fencing(&ordered));
}

/// A real state machine state with two files and one written block each.
fn state_with_files() -> lockmgr::state::VolumeState {
    use csv_core::meta::{Extent, ExtentState, FileKind, Timestamp, VolumeInfo};
    use csv_core::op::{Op, Response};
    use lockmgr::types::Command;
    let mut s = lockmgr::state::VolumeState::new();
    let mut apply = |op: Op| {
        s.apply(&Command {
            now_ms: 1_000,
            op,
            origin: None,
        })
    };
    apply(Op::InitVolume {
        info: VolumeInfo {
            uuid: "00000000-0000-0000-0000-000000000001".into(),
            block_size: 4096,
            total_blocks: 1024,
            data_start_block: 16,
        },
    });
    let Response::Session(session) = apply(Op::OpenSession {
        node: 1,
        ttl_ms: 10_000,
    }) else {
        panic!("no session");
    };
    for name in ["a", "b"] {
        let Response::Attr(attr) = apply(Op::Create {
            parent: csv_core::meta::ROOT_INO,
            name: name.into(),
            kind: FileKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            symlink: None,
        }) else {
            panic!("create");
        };
        let Response::Reserved(r) = apply(Op::Reserve { session, blocks: 1 }) else {
            panic!("reserve");
        };
        let r = apply(Op::CommitWrite {
            session,
            ino: attr.ino,
            token: None,
            extents: vec![Extent {
                file_block: 0,
                lun_block: r[0].start,
                len: 1,
                state: ExtentState::Written,
            }],
            size: Some(4096),
            mtime: Timestamp::from_millis(1_000),
        });
        assert!(matches!(r, Response::AttrFreed(..)), "{r:?}");
    }
    s
}

fn fsck_final(s: &lockmgr::state::VolumeState) -> FinalState {
    FinalState {
        nodes: vec![1],
        fsck: vec![NodeFsck {
            node: 1,
            applied: 10,
            violations: Some(s.check_invariants().err().unwrap_or_default()),
            error: String::new(),
        }],
        ..Default::default()
    }
}

#[test]
fn a_double_allocated_extent_is_caught() {
    let good = state_with_files();
    assert_clean(&checker::fsck(&fsck_final(&good)));

    // Inject the bug through the state's own encoding: file "b" now maps the LUN block
    // that file "a" owns.
    let mut json = serde_json::to_value(&good).unwrap();
    let inodes = json["inodes"].as_object_mut().unwrap();
    let lun_of = |i: &serde_json::Value| {
        i["extents"]
            .as_object()
            .and_then(|m| m.values().next())
            .map(|e| e["lun_block"].clone())
    };
    let (mut first, mut second) = (None, None);
    for (k, v) in inodes.iter() {
        if let Some(b) = lun_of(v) {
            if first.is_none() {
                first = Some(b);
            } else {
                second = Some(k.clone());
            }
        }
    }
    let victim = inodes.get_mut(&second.unwrap()).unwrap();
    for e in victim["extents"].as_object_mut().unwrap().values_mut() {
        e["lun_block"] = first.clone().unwrap();
    }
    let bad: lockmgr::state::VolumeState = serde_json::from_value(json).unwrap();
    let v = checker::fsck(&fsck_final(&bad));
    assert_caught(&v, "a double-allocated extent");
    assert!(v.detail.contains("node 1"), "{}", v.detail);

    // A replica that did not answer is not "clean".
    let mut silent = fsck_final(&good);
    silent.fsck[0].violations = None;
    assert_caught(&checker::fsck(&silent), "an unanswered fsck");
}

#[test]
fn diverged_replicas_and_redirected_nodes_are_caught() {
    let digest = |node, applied, d: &str| NodeDigest {
        node,
        applied: Some(applied),
        digest: Some(d.into()),
        error: String::new(),
    };
    let path = |node, p: &str| NodePath {
        node,
        alive: true,
        path: p.into(),
    };
    let mut f = FinalState {
        converge_s: Some(1.0),
        nodes: vec![1, 2, 3],
        digests: vec![
            digest(1, 50, "aa"),
            digest(2, 50, "aa"),
            digest(3, 50, "aa"),
        ],
        paths: vec![path(1, "direct"), path(2, "direct"), path(3, "direct")],
        fsck: Vec::new(),
    };
    assert_clean(&checker::raft_identical(&f));
    assert_clean(&checker::direct_io(&f));
    assert_clean(&checker::converged(&f));
    f.digests[2] = digest(3, 50, "bb");
    assert_caught(&checker::raft_identical(&f), "a diverged replica");
    f.digests.pop();
    assert_caught(&checker::raft_identical(&f), "a replica without a digest");
    f.paths[1] = path(2, "redirected");
    assert_caught(&checker::direct_io(&f), "a node left redirected");
    f.converge_s = None;
    assert_caught(&checker::converged(&f), "no convergence");
}

proptest! {
    #[test]
    fn history_files_of_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.jsonl");
        std::fs::write(&p, &bytes).unwrap();
        let _ = History::load(&p);
    }

    #[test]
    fn checkers_never_panic_on_arbitrary_histories(
        ops in proptest::collection::vec((0u8..6, 0u64..4, 0u64..6, 0.0f64..10.0, 0.0f64..2.0, 0u8..3), 0..60)
    ) {
        let recs: Vec<OpRecord> = ops.iter().enumerate().map(|(i, (k, b, t, at, len, o))| {
            let kind = match k {
                0 => OpKind::BlockWrite { target: format!("t{}", t % 2), block: *b, op_id: i as u64 + 1, crc: 0, fua: *t % 2 == 0, conn: *t % 3 },
                1 => OpKind::BlockRead { target: format!("t{}", b % 2), block: *b, observed: *t, crc_ok: true, final_check: *t % 2 == 0 },
                2 => OpKind::Flush { target: if *b == 0 { String::new() } else { format!("t{}", b % 2) }, conn: *t % 3 },
                3 => OpKind::LockAcquire { key: format!("k{b}"), token: Some(*t) },
                4 => OpKind::LockValidate { key: format!("k{b}"), token: *t },
                _ => OpKind::FencedWrite { ino: *b, token: *t, file_block: 0 },
            };
            let outcome = [Outcome::Ok, Outcome::Failed, Outcome::Indeterminate][*o as usize];
            op(i as u64 + 1, (*b % 2) as u32, *b, kind, (*at, at + len), outcome)
        }).collect();
        let h = History {
            header: RunHeader { seed: 0, nodes: 1, duration_s: 10.0, faults: vec![], workloads: vec![], version: "t".into() },
            ops: recs,
            faults: vec![],
            final_state: None,
        };
        let r = Report::from_history(&h, "x");
        prop_assert!(!r.valid, "no final state must never be valid");
    }
}

// ---- real runs ------------------------------------------------------------------------------

/// Real runs take turns: the machine has two cores, and a process spawned by one run (an
/// nbdkit, a restarted csvd) closes at exec every FUSE file this test process holds open,
/// each close waiting for its daemon, so one run's paused or cut-off node would stall
/// another run's fault injection.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The CI shape: shorter faults, so that a 20 s run holds several.
fn ci_shape() -> ScheduleShape {
    ScheduleShape {
        warmup_s: 2.0,
        tail_s: 2.0,
        min_fault_s: 0.5,
        max_fault_s: 5.0,
        min_gap_s: 0.5,
        max_gap_s: 2.0,
    }
}

const KINDS: [FaultKind; 4] = [
    FaultKind::Kill,
    FaultKind::Pause,
    FaultKind::Leader,
    FaultKind::Migrate,
];

/// The first two seeds from 1 whose schedules together hit with every kind.
fn ci_seeds(run_s: f64) -> [u64; 2] {
    let kinds_of = |s| -> BTreeSet<FaultKind> {
        schedule::plan(s, &[1, 2, 3], run_s, &KINDS, ci_shape())
            .iter()
            .map(|f| f.kind)
            .collect()
    };
    for a in 1u64.. {
        let b = a + 1;
        let mut all = kinds_of(a);
        all.extend(kinds_of(b));
        if all.len() == KINDS.len() && kinds_of(a).contains(&FaultKind::Leader) {
            return [a, b];
        }
    }
    unreachable!("seeds are unbounded")
}

fn options(seed: u64, dir: &Path, keep: Option<PathBuf>) -> ChaosOptions {
    let mut o = ChaosOptions::new(3, Duration::from_secs(20), seed);
    o.faults = KINDS.to_vec();
    o.workloads = WorkloadKind::ALL.to_vec();
    o.csvd = common::csvd_bin();
    o.shape = ci_shape();
    o.history = Some(dir.join(format!("chaos-{seed}.jsonl")));
    o.keep = keep;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_chaos_runs_on_three_nodes_are_valid_and_recheck_identically() {
    let _one = SERIAL.lock().await;
    let seeds = ci_seeds(20.0);
    let dir = tempfile::tempdir().unwrap();
    for seed in seeds {
        eprintln!("chaos seed {seed}");
        let keep = dir.path().join(format!("cluster-{seed}"));
        let report = match chaos::run(&options(seed, dir.path(), Some(keep.clone()))).await {
            Ok(r) => r,
            Err(e) => {
                common::dump_logs(&keep);
                common::kill_everything(&keep);
                panic!("seed {seed}: the run failed: {e:#}");
            }
        };
        if !report.valid {
            common::dump_logs(&keep);
            common::kill_everything(&keep);
            let kept = dir.keep();
            panic!(
                "seed {seed} (history and cluster kept in {}):\n{}",
                kept.display(),
                report.table()
            );
        }
        assert!(
            !report.faults.is_empty(),
            "seed {seed}: no faults were injected"
        );
        assert!(
            report
                .faults
                .iter()
                .all(|f| !f.detail.starts_with("not injected")),
            "seed {seed}: {:?}",
            report.faults
        );
        assert!(
            report.ops.ok > 100,
            "seed {seed}: too little work: {:?}",
            report.ops
        );
        // The block checkers had block writes and reads to check, from both workloads.
        for w in ["nbd", "fuse"] {
            let ok = report.ops_by_workload.get(w).map_or(0, |c| c.ok);
            assert!(ok > 50, "seed {seed}: workload {w} did too little: {ok} ok");
        }
        for c in ["no-lost-write", "no-stale-read"] {
            assert!(
                !report.checkers[c].detail.starts_with("no block"),
                "seed {seed}: {c} was vacuous"
            );
        }
        // The history alone gives the same verdicts.
        let again = Report::from_history(
            &History::load(Path::new(&report.history)).unwrap(),
            &report.history,
        );
        assert_eq!(again.checkers, report.checkers);
        assert_eq!(again.ops, report.ops);
        eprintln!("{}", report.table());
        common::kill_everything(&keep);
    }
}

/// A cluster file as `cluster up` writes it, for a cluster that is not running: enough for
/// the checks that must refuse before anything starts.
fn stopped_cluster(dir: &Path, san_mode: csvd::cluster::SanMode) -> csvd::cluster::ClusterFile {
    let f = csvd::cluster::ClusterFile {
        lun: dir.join("lun.img"),
        volume_uuid: "00000000-0000-0000-0000-000000000001".into(),
        nodes: (1..=3)
            .map(|id| csvd::cluster::NodeEntry {
                id,
                pid: 0,
                rpc: "127.0.0.1:1".into(),
                nbd: "127.0.0.1:1".into(),
                mount: dir.join(format!("node{id}/mnt")),
                san: String::new(),
                san_pid: None,
            })
            .collect(),
        secret_file: dir.join("secret"),
        san_mode,
        netns: None,
    };
    f.save(dir).unwrap();
    f
}

#[tokio::test]
async fn san_and_partition_faults_on_a_cluster_without_nbdkit_or_netns_and_migrate_without_nbd_are_refused_before_anything_starts()
 {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let cdir = dir.path().join("cluster");
    std::fs::create_dir(&cdir).unwrap();
    stopped_cluster(&cdir, csvd::cluster::SanMode::File);
    let refused = |kinds: Vec<FaultKind>| {
        let mut o = options(1, &out, None);
        o.cluster = Some(cdir.clone());
        o.faults = kinds;
        async move {
            let e = chaos::run(&o).await.expect_err("must be refused");
            match e {
                ChaosError::Options(m) => m,
                other => panic!("{other:#}"),
            }
        }
    };
    for kind in [FaultKind::SanDown, FaultKind::SanHang, FaultKind::SanFlaky] {
        let m = refused(vec![FaultKind::Kill, kind]).await;
        assert!(
            m.contains(kind.name()) && m.contains("--san nbdkit") && m.contains("directly"),
            "{m}"
        );
    }
    let m = refused(vec![FaultKind::Partition, FaultKind::Pause]).await;
    assert!(m.contains("partition") && m.contains("--netns"), "{m}");
    // An nbdkit cluster takes the SAN faults past this check, but not a partition.
    stopped_cluster(&cdir, csvd::cluster::SanMode::Nbdkit);
    let m = refused(vec![FaultKind::SanDown, FaultKind::Partition]).await;
    assert!(m.contains("--netns") && !m.contains("san-down"), "{m}");

    let mut o = options(1, &out, None);
    o.workloads = vec![WorkloadKind::Meta, WorkloadKind::Fuse];
    let e = chaos::run(&o)
        .await
        .expect_err("migrate needs the nbd workload");
    assert!(
        matches!(&e, ChaosError::Options(m) if m.contains("nbd")),
        "{e:#}"
    );
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "nothing may be created"
    );
    assert_eq!(
        std::fs::read_dir(&cdir).unwrap().count(),
        1,
        "only cluster.json: nothing may be created"
    );
}

/// Runs `o` (keeping its cluster in `keep`), and panics with the logs and the report if
/// the run failed or is invalid, or if a fault was not injected or hit a cluster that had
/// not recovered from the previous one.
async fn run_valid(o: &ChaosOptions, keep: &Path) -> Report {
    let seed = o.seed;
    for f in schedule::plan(
        seed,
        &[1, 2, 3],
        o.duration.as_secs_f64(),
        &o.faults,
        o.shape,
    ) {
        eprintln!(
            "planned: {} node {:?} at {:.2}s for {:.2}s",
            f.kind, f.node, f.at_s, f.duration_s
        );
    }
    let report = match chaos::run(o).await {
        Ok(r) => r,
        Err(e) => {
            common::dump_logs(keep);
            common::kill_everything(keep);
            panic!("seed {seed}: the run failed: {e:#}");
        }
    };
    eprintln!("{}", report.table());
    if !report.valid {
        common::dump_logs(keep);
        common::kill_everything(keep);
        panic!("seed {seed}: invalid:\n{}", report.table());
    }
    for k in &o.faults {
        assert!(
            report.faults.iter().any(|f| f.kind == k.name()),
            "seed {seed}: no {k} fault was injected: {:?}",
            report.faults
        );
    }
    for f in &report.faults {
        assert!(
            !f.detail.starts_with("not injected") && !f.detail.contains("not ready"),
            "seed {seed}: {f:?}"
        );
    }
    for w in o
        .workloads
        .iter()
        .map(|w| w.name())
        .filter(|w| *w != "meta")
    {
        let ok = report.ops_by_workload.get(w).map_or(0, |c| c.ok);
        assert!(ok > 50, "seed {seed}: workload {w} did too little: {ok} ok");
    }
    common::kill_everything(keep);
    report
}

/// The length of the SAN path and partition runs, in seconds.
const LAN_SAN_RUN_S: f64 = 30.0;

/// A leader cut at least this long must see the others start an election (see the
/// assertions in `partition_run`); the seed has two of them. openraft 0.9's longest wait
/// before a follower's first vote is the old leader's lease (election_timeout_max, 0.8 s)
/// plus an election timeout (up to 0.8 s) plus, for a voter that saw a longer log, twice
/// election_timeout_max (1.6 s): 3.2 s, and 1 s more for ticks on two busy cores. (At 3.0 s a
/// 3.54 s cut once healed with no new term on a slower machine.)
const LEADER_CUT_ELECTS_S: f64 = 4.2;

/// Longer faults than CI's default shape: a hung path is detected after the redirector's
/// 1 s I/O timeout, and a partition outlasts an election.
fn lan_san_shape() -> ScheduleShape {
    ScheduleShape {
        warmup_s: 2.0,
        tail_s: 2.0,
        min_fault_s: 2.0,
        max_fault_s: 4.0,
        min_gap_s: 0.5,
        max_gap_s: 1.5,
    }
}

/// The partition runs' shape: faults long enough for leader cuts that must elect.
fn partition_shape() -> ScheduleShape {
    ScheduleShape {
        max_fault_s: 5.5,
        ..lan_san_shape()
    }
}

/// The first seed from 1 whose schedule (`shape`) of `run_s` seconds holds every kind of `kinds`
/// with 6 s to spare before the quiet tail (a fault starts late while the cluster
/// recovers from the previous one: a node whose SAN path failed again soon after failing
/// back needs up to 8 s of healthy probes), and satisfies `also`.
fn seed_with(
    run_s: f64,
    kinds: &[FaultKind],
    shape: ScheduleShape,
    also: impl Fn(&[schedule::PlannedFault]) -> bool,
) -> u64 {
    (1u64..)
        .find(|&s| {
            let p = schedule::plan(s, &[1, 2, 3], run_s, kinds, shape);
            // Each kind must be planned early enough to survive the waits for recovery
            // before each fault (a node failing back to direct I/O takes seconds; under
            // load one wait reached 3.7 s and pushed a late fault past the end).
            let slack = run_s - shape.tail_s - 12.0;
            kinds.iter().all(|k| {
                p.iter()
                    .any(|f| f.kind == *k && f.at_s + f.duration_s <= slack)
            }) && also(&p)
        })
        .expect("seeds are unbounded")
}

/// The count in a detail such as "redirector: 143 requests via peers, ...".
fn via_peers(detail: &str) -> Option<u64> {
    let (before, _) = detail.split_once(" requests via peers")?;
    before.rsplit(' ').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn san_path_faults_are_ridden_out_by_the_redirector_and_the_run_is_valid() {
    let _one = SERIAL.lock().await;
    let kinds = [FaultKind::SanDown, FaultKind::SanHang, FaultKind::SanFlaky];
    let seed = seed_with(LAN_SAN_RUN_S, &kinds, lan_san_shape(), |_| true);
    eprintln!("chaos seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("cluster");
    let mut o = options(seed, dir.path(), Some(keep.clone()));
    o.duration = Duration::from_secs_f64(LAN_SAN_RUN_S);
    o.faults = kinds.to_vec();
    o.shape = lan_san_shape();
    let report = run_valid(&o, &keep).await;
    assert!(report.checkers["direct-io"].valid);
    // The redirector carried the faulted node's I/O through a peer while its path was down.
    let down: Vec<_> = report
        .faults
        .iter()
        .filter(|f| f.kind == "san-down")
        .collect();
    assert!(
        down.iter()
            .any(|f| via_peers(&f.detail).is_some_and(|n| n > 0)),
        "no san-down fault shows redirected I/O: {down:?}"
    );
    for f in report.faults.iter().filter(|f| f.kind.starts_with("san-")) {
        assert!(f.detail.contains("redirector"), "{f:?}");
    }
}

/// With every workload: NBD writers, FUSE files and metadata. (An earlier build answered
/// `EPERM` for an NBD write whose device was revoked while the write was in flight; the
/// write had landed, and the no-lost-write checker read it back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_of_a_node_and_of_the_leader_are_healed_and_the_run_is_valid() {
    partition_run(&WorkloadKind::ALL).await;
}

async fn partition_run(workloads: &[WorkloadKind]) {
    let _one = SERIAL.lock().await;
    use csvd::chaos::nemesis::PartitionShape;
    let kinds = [FaultKind::Partition];
    let seed = seed_with(LAN_SAN_RUN_S, &kinds, partition_shape(), |p| {
        let shapes: BTreeSet<String> = p
            .iter()
            .map(|f| format!("{:?}", PartitionShape::of(f, 3)))
            .collect();
        let long_leader_cuts = p
            .iter()
            .filter(|f| {
                PartitionShape::of(f, 3) == PartitionShape::Leader
                    && f.duration_s >= LEADER_CUT_ELECTS_S
            })
            .count();
        shapes.len() == 2 && long_leader_cuts >= 2
    });
    eprintln!("chaos seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("cluster");
    let mut o = options(seed, dir.path(), Some(keep.clone()));
    o.duration = Duration::from_secs_f64(LAN_SAN_RUN_S);
    o.faults = kinds.to_vec();
    o.workloads = workloads.to_vec();
    o.shape = partition_shape();
    let report = run_valid(&o, &keep).await;
    for f in &report.faults {
        assert!(
            f.detail.contains("off from") && f.detail.contains("at heal"),
            "{f:?}"
        );
    }
    // With the leader cut off for LEADER_CUT_ELECTS_S or more, the other two noticed and
    // started electing (a term moved on), and in at least one cut they finished: a new leader
    // by the heal. Not in every cut:
    // openraft 0.9 waits out the old leader's lease (0.8 s) plus an election timeout (0.4-0.8 s)
    // before its first vote, a voter that saw a longer log waits 1.6 s more, and a split vote
    // costs another round, so a 2-4 s cut can heal first (seen in CI on two busy cores, with a
    // 2.2 s and a 3.5 s cut).
    let leader_cut: Vec<_> = report
        .faults
        .iter()
        .filter(|f| f.detail.contains("cut the leader"))
        .collect();
    assert!(!leader_cut.is_empty(), "{:?}", report.faults);
    let mut elected = 0;
    for f in leader_cut {
        let old = f.node.unwrap();
        let (before, heal) = f.detail.split_once("at heal: ").unwrap();
        let old_term = last_term(before).unwrap_or_else(|| panic!("no term before the cut: {f:?}"));
        // Groups read "2,3: leader 2 term 4" or "2,3: no leader, term 4"; a group holding
        // the old leader and others ("1,2,3: leader 1 term 9") is the others' view too.
        let majority: Vec<(Option<u64>, u64)> = heal
            .split("; ")
            .filter_map(|g| {
                let (ids, view) = g.split_once(": ")?;
                if ids.split(',').all(|i| i == old.to_string()) {
                    return None;
                }
                let leader = view
                    .strip_prefix("leader ")
                    .and_then(|v| v.split(' ').next())
                    .and_then(|l| l.parse().ok());
                Some((leader, last_term(view)?))
            })
            .collect();
        assert!(!majority.is_empty(), "no majority view at heal: {f:?}");
        // A shorter cut can heal before the first vote (seen under load: 2.2 s, no new term).
        if f.end_s - f.start_s >= LEADER_CUT_ELECTS_S {
            assert!(
                majority.iter().any(|&(_, term)| term > old_term),
                "the majority side did not start an election: {f:?}"
            );
        }
        if majority.iter().any(|&(l, _)| l.is_some_and(|l| l != old)) {
            elected += 1;
        }
    }
    assert!(
        elected > 0,
        "no leader cut ended with a new leader: {:?}",
        report.faults
    );
}

/// The number after the last "term " in a leader view ("1,2: leader 1 term 8)" gives 8).
fn last_term(view: &str) -> Option<u64> {
    view.rsplit("term ")
        .next()?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn file_hashes(store: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_fsck_checks_stopped_stores_without_changing_them_and_refuses_running_ones() {
    let _one = SERIAL.lock().await;
    let mut c = common::TestCluster::up(3).await;
    // Some metadata to check: creates through every node.
    for n in 1..=3u64 {
        let r = c
            .call(
                n,
                lockmgr::rpc::message::Request::Submit(csv_core::op::Op::Create {
                    parent: csv_core::meta::ROOT_INO,
                    name: format!("f{n}"),
                    kind: csv_core::meta::FileKind::File,
                    perm: 0o644,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    symlink: None,
                }),
            )
            .await;
        assert!(
            matches!(r, lockmgr::rpc::message::Reply::Write(Ok(_))),
            "{r:?}"
        );
    }
    let running = csvd::fsck::offline(&c.path().join("node1")).await;
    assert!(
        matches!(running, Err(csvd::fsck::FsckError::InUse(_))),
        "a running node's store must be refused: {running:?}"
    );
    let dir = c.path().to_path_buf();
    csvd::cluster::down(&dir, &mut c.children).await.unwrap();
    for n in 1..=3u64 {
        let store = csvd::fsck::find_store(&c.path().join(format!("node{n}"))).unwrap();
        let before = file_hashes(&store);
        let r = csvd::fsck::offline(&c.path().join(format!("node{n}")))
            .await
            .unwrap();
        assert!(r.violations.is_empty(), "node {n}: {:?}", r.violations);
        assert!(
            r.applied > 5,
            "node {n}: recovered only up to {}",
            r.applied
        );
        assert!(
            before == file_hashes(&store),
            "node {n}: the offline fsck changed the store"
        );
    }
    assert!(matches!(
        csvd::fsck::offline(c.path()).await,
        Err(csvd::fsck::FsckError::NoStore(_))
    ));
}
