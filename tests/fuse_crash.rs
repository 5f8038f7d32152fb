//! Crashes and a full LUN through the FUSE mounts: kill -9 a node in the middle of
//! writes, restart it, and check that every fsync'd byte is there, that no stale or
//! foreign byte appears, that the dead node's reservation went back to the pool and the
//! metadata passes fsck; and ENOSPC on a small LUN without losing written data.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{TestCluster, fsck, mnt, wait_mounted, wait_until};
use lockmgr::rpc::message::{Query, QueryReply};

const CHUNK: usize = 64 << 10;
/// The byte a deleted file left all over the LUN: it must never appear in another file.
const FOREIGN: u8 = 0xEE;

fn chunk_byte(i: u64) -> u8 {
    (i % 200) as u8 + 1
}

async fn space(c: &TestCluster) -> csv_core::meta::SpaceInfo {
    match c.client().query(Query::Space).await.unwrap() {
        QueryReply::Space(s) => s,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_writes_keeps_every_fsynced_byte_and_reclaims_the_reservation() {
    let mut c = TestCluster::up(2).await;
    let (a, b) = (mnt(&c, 1), mnt(&c, 2));
    // A file full of FOREIGN bytes, deleted: its blocks go back to the pool.
    fs::write(b.join("old"), vec![FOREIGN; 16 << 20]).unwrap();
    fs::remove_file(b.join("old")).unwrap();

    // Node 2 writes chunks, fsyncing every 4th, until it is killed.
    let synced = Arc::new(AtomicU64::new(0));
    let writer = {
        let (path, synced) = (b.join("vm.img"), synced.clone());
        std::thread::spawn(move || {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .unwrap();
            for i in 0u64.. {
                if f.write_all_at(&vec![chunk_byte(i); CHUNK], i * CHUNK as u64)
                    .is_err()
                {
                    return i;
                }
                if i % 4 == 3 {
                    if f.sync_all().is_err() {
                        return i;
                    }
                    synced.store(i + 1, Ordering::SeqCst);
                }
            }
            unreachable!()
        })
    };
    wait_until(Duration::from_secs(30), "some fsync'd writes", || {
        synced.load(Ordering::SeqCst) >= 40
    });
    let reserved_before = space(&c).await.reserved_blocks;
    assert!(reserved_before > 0, "the writer should hold a reservation");
    c.kill9(2);
    let attempted = writer.join().unwrap();
    let synced = synced.load(Ordering::SeqCst);
    eprintln!("killed after {attempted} chunks, {synced} fsync'd");

    // Node 1 reads as soon as node 2's session (and lock) expire.
    let data = fs::read(a.join("vm.img")).unwrap();
    assert!(
        data.len() as u64 >= synced * CHUNK as u64,
        "file shorter than what was fsync'd"
    );
    for (i, ch) in data.chunks(CHUNK).enumerate() {
        let i = i as u64;
        if i < synced {
            assert!(
                ch.iter().all(|&x| x == chunk_byte(i)),
                "fsync'd chunk {i} damaged"
            );
        } else {
            assert!(
                ch.iter().all(|&x| x == chunk_byte(i) || x == 0),
                "chunk {i} holds bytes never written to it"
            );
        }
    }
    assert!(!data.contains(&FOREIGN));

    // The dead node's reservation went back to the pool when its session expired.
    let s = space(&c).await;
    assert_eq!(s.reserved_blocks, 0, "reservation not reclaimed: {s:?}");
    fsck(&c).await;

    // Node 2 comes back (cleaning its dead mount) and sees the same file.
    c.restart(2);
    wait_mounted(&c, 2, Duration::from_secs(60));
    assert_eq!(fs::read(b.join("vm.img")).unwrap(), data);
    fsck(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_lun_gives_enospc_and_keeps_what_was_written() {
    let c = TestCluster::up_with(2, |o| o.lun_size = 16 << 20).await;
    let (a, b) = (mnt(&c, 1), mnt(&c, 2));
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(a.join("fill"))
        .unwrap();
    let mut written = 0u64;
    let err = loop {
        match f.write_all_at(&vec![chunk_byte(written / CHUNK as u64); CHUNK], written) {
            Ok(()) => written += CHUNK as u64,
            Err(e) => break e,
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written >= 12 << 20, "only {written} bytes fit");
    f.sync_all().unwrap();
    drop(f);
    // Everything written before ENOSPC is there, read from the other node.
    let data = fs::read(b.join("fill")).unwrap();
    assert!(data.len() as u64 >= written);
    for (i, ch) in data
        .chunks(CHUNK)
        .enumerate()
        .take((written / CHUNK as u64) as usize)
    {
        assert!(
            ch.iter().all(|&x| x == chunk_byte(i as u64)),
            "chunk {i} lost"
        );
    }
    // Metadata still works on a full volume, and removing the file frees the space.
    assert_eq!(
        fs::write(b.join("more"), vec![1u8; 1 << 20])
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOSPC)
    );
    fs::remove_file(b.join("fill")).unwrap();
    fs::write(b.join("more"), vec![1u8; 1 << 20]).unwrap();
    fsck(&c).await;
}
