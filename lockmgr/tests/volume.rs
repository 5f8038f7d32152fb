//! The volume layer (csv-core `Volume`) against the real metadata state machine, in
//! process: `InProcessCluster` (a `VolumeState` shared by several "nodes") and a
//! `MemLun` with a volatile write cache. Covers the data path, cross-node coherence
//! through lock breaks, fencing, ENOSPC, and a model-based crash test.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use csv_core::lun::{Lun, MemLun};
use csv_core::meta::{FallocMode, FileKind, MetaError, ROOT_INO, VolumeInfo};
use csv_core::volume::{MetaClient, Volume, VolumeConfig, VolumeError};
use lockmgr::client::{InProcessCluster, InProcessMeta};
use lockmgr::state::VolumeState;
use lockmgr::types::Op;

const BS: u64 = 4096;

fn cluster(blocks: u64) -> (InProcessCluster, Arc<MemLun>) {
    let c = InProcessCluster::new(VolumeState::new());
    c.apply(Op::InitVolume {
        info: VolumeInfo {
            uuid: "00000000-0000-0000-0000-000000000001".into(),
            block_size: BS as u32,
            total_blocks: blocks,
            data_start_block: 1,
        },
    })
    .into_result()
    .unwrap();
    (c, Arc::new(MemLun::new(blocks * BS)))
}

fn cfg() -> VolumeConfig {
    VolumeConfig {
        reserve_chunk_bytes: 64 * BS,
        placement_bytes: 16 * BS,
        commit_delay: Duration::from_millis(1),
        lock_wait: Duration::from_secs(5),
        break_holdoff: Duration::from_millis(1),
        scan_interval: Duration::from_millis(5),
    }
}

async fn node(c: &InProcessCluster, id: u64, lun: &Arc<MemLun>) -> (Volume, Arc<InProcessMeta>) {
    let meta = Arc::new(c.node(id, 60_000).unwrap());
    let lun: Arc<dyn Lun> = lun.clone();
    let v = Volume::open(meta.clone() as Arc<dyn MetaClient>, lun, cfg())
        .await
        .unwrap();
    (v, meta)
}

async fn mkfile(v: &Volume, name: &str) -> u64 {
    v.create(ROOT_INO, name, FileKind::File, 0o644, 0, 0, 0)
        .await
        .unwrap()
        .ino
}

fn fsck(c: &InProcessCluster) {
    c.read(|s| s.check_invariants()).unwrap();
}

#[tokio::test]
async fn unaligned_writes_read_back_and_new_blocks_never_show_stale_bytes() {
    let (c, lun) = cluster(1024);
    // Stale content all over the LUN: a new block must never show it.
    lun.write_at(0, Bytes::from(vec![0xEE; 1024 * BS as usize]), false)
        .await
        .unwrap();
    let (v, _) = node(&c, 1, &lun).await;
    let ino = mkfile(&v, "f").await;
    let (f, _) = v.open_file(ino, true).await.unwrap();
    f.write(5000, Bytes::from_static(b"hello")).await.unwrap();
    f.write(BS * 3 - 2, Bytes::from_static(b"abcd"))
        .await
        .unwrap();
    let data = f.read(0, 4 * BS as usize).await.unwrap();
    assert_eq!(data.len() as u64, BS * 3 + 2);
    let mut want = vec![0u8; (BS * 3 + 2) as usize];
    want[5000..5005].copy_from_slice(b"hello");
    want[(BS * 3 - 2) as usize..].copy_from_slice(b"abcd");
    assert_eq!(&data[..], &want[..]);
    f.fsync().await.unwrap();
    assert_eq!(v.getattr(ino).await.unwrap().size, BS * 3 + 2);
    // Block 0 was never written: still a hole.
    assert_eq!(f.seek_data(0).await.unwrap(), Some(BS));
    assert_eq!(f.seek_hole(BS).await.unwrap(), Some(BS * 3 + 2));
    fsck(&c);
}

#[tokio::test]
async fn another_node_reads_exactly_what_was_fsynced_and_writers_ping_pong() {
    let (c, lun) = cluster(2048);
    let (a, _) = node(&c, 1, &lun).await;
    let (b, _) = node(&c, 2, &lun).await;
    let ino = mkfile(&a, "disk").await;
    let (fa, _) = a.open_file(ino, true).await.unwrap();
    let (fb, _) = b.open_file(ino, true).await.unwrap();
    let mut model = vec![0u8; 64 * 1024];
    for i in 0..40u64 {
        let off = (i * 7919) % 60_000;
        let len = 1 + (i * 131) % 3000;
        let byte = (i % 250) as u8 + 1;
        let data = Bytes::from(vec![byte; len as usize]);
        let (w, r) = if i % 2 == 0 { (&fa, &fb) } else { (&fb, &fa) };
        w.write(off, data).await.unwrap();
        model[off as usize..(off + len) as usize].fill(byte);
        // The other node reads right away: the lock break makes the writer commit.
        let got = r.read(off, len as usize).await.unwrap();
        assert_eq!(
            &got[..],
            &model[off as usize..(off + len) as usize],
            "step {i}"
        );
    }
    fa.fsync().await.unwrap();
    fb.fsync().await.unwrap();
    let size = a.getattr(ino).await.unwrap().size as usize;
    assert_eq!(&fa.read(0, size).await.unwrap()[..], &model[..size]);
    assert_eq!(&fb.read(0, size).await.unwrap()[..], &model[..size]);
    fsck(&c);
}

#[tokio::test]
async fn new_blocks_sit_where_file_and_lun_offsets_agree_modulo_the_placement_unit() {
    // The data area starts at block 1: without placement a file's block 0 would land
    // there, one block off every 16-block unit (cfg's placement_bytes).
    let (c, lun) = cluster(2048);
    let (v, _) = node(&c, 1, &lun).await;
    let unit = cfg().placement_bytes / BS;
    let ino = mkfile(&v, "disk").await;
    let (f, _) = v.open_file(ino, true).await.unwrap();
    // Sequential writes of a unit each, then writes that start mid-unit.
    for u in 0..4u64 {
        f.write(
            u * unit * BS,
            Bytes::from(vec![u as u8 + 1; (unit * BS) as usize]),
        )
        .await
        .unwrap();
    }
    f.write(
        9 * unit * BS + 5 * BS,
        Bytes::from(vec![9; 3 * BS as usize]),
    )
    .await
    .unwrap();
    // A small file in between must not shift the next file's placement.
    let small = mkfile(&v, "small").await;
    let (s, _) = v.open_file(small, true).await.unwrap();
    s.write(0, Bytes::from(vec![7; 100])).await.unwrap();
    let other = mkfile(&v, "other").await;
    let (o, _) = v.open_file(other, true).await.unwrap();
    o.write(0, Bytes::from(vec![8; (2 * unit * BS) as usize]))
        .await
        .unwrap();
    for h in [&f, &s, &o] {
        h.fsync().await.unwrap();
    }
    for i in [ino, other] {
        let extents = c.read(|st| st.extents(i, 0, u64::MAX)).unwrap();
        assert!(!extents.is_empty());
        for e in &extents {
            assert_eq!(
                e.lun_block % unit,
                e.file_block % unit,
                "ino {i}: {e:?} is not placed"
            );
        }
    }
    // One extent for the four sequential units: placement keeps them contiguous.
    let first = c.read(|st| st.extents(ino, 0, 4 * unit)).unwrap();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(&f.read(unit * BS, 4).await.unwrap()[..], &[2; 4]);
    assert_eq!(&o.read(0, 4).await.unwrap()[..], &[8; 4]);
    fsck(&c);
}

#[tokio::test]
async fn truncate_zeroes_the_tail_and_extension_reads_zeros() {
    let (c, lun) = cluster(1024);
    let (v, _) = node(&c, 1, &lun).await;
    let ino = mkfile(&v, "t").await;
    let (f, _) = v.open_file(ino, true).await.unwrap();
    f.write(0, Bytes::from(vec![7u8; 3 * BS as usize]))
        .await
        .unwrap();
    f.fsync().await.unwrap();
    v.setattr(
        ino,
        csv_core::volume::SetAttr {
            size: Some(100),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    v.setattr(
        ino,
        csv_core::volume::SetAttr {
            size: Some(2 * BS),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let d = f.read(0, 2 * BS as usize).await.unwrap();
    assert!(d[..100].iter().all(|&b| b == 7));
    assert!(
        d[100..].iter().all(|&b| b == 0),
        "stale tail after truncate"
    );
    assert_eq!(c.read(|s| s.getattr(ino)).unwrap().blocks, 1);
    fsck(&c);
}

#[tokio::test]
async fn fallocate_modes_and_seek() {
    let (c, lun) = cluster(1024);
    let (v, _) = node(&c, 1, &lun).await;
    let ino = mkfile(&v, "fa").await;
    let (f, _) = v.open_file(ino, true).await.unwrap();
    f.write(0, Bytes::from(vec![9u8; 8 * BS as usize]))
        .await
        .unwrap();
    // Punch 1.5 blocks in the middle: edges zeroed, the whole block freed.
    f.fallocate(BS + BS / 2, 2 * BS, FallocMode::PunchHole)
        .await
        .unwrap();
    let d = f.read(0, 8 * BS as usize).await.unwrap();
    let (p0, p1) = ((BS + BS / 2) as usize, (3 * BS + BS / 2) as usize);
    assert!(d[..p0].iter().all(|&b| b == 9));
    assert!(d[p0..p1].iter().all(|&b| b == 0));
    assert!(d[p1..].iter().all(|&b| b == 9));
    assert_eq!(c.read(|s| s.getattr(ino)).unwrap().blocks, 7);
    assert_eq!(f.seek_hole(0).await.unwrap(), Some(2 * BS));
    assert_eq!(f.seek_data(2 * BS).await.unwrap(), Some(3 * BS));
    // Zero range keeps the blocks, reads zeros.
    f.fallocate(4 * BS, 2 * BS, FallocMode::ZeroRange { keep_size: true })
        .await
        .unwrap();
    let d = f.read(4 * BS, 2 * BS as usize).await.unwrap();
    assert!(d.iter().all(|&b| b == 0));
    // A partial write into an unwritten block: the rest of the block stays zero.
    f.write(4 * BS + 10, Bytes::from_static(b"x"))
        .await
        .unwrap();
    let d = f.read(4 * BS, BS as usize).await.unwrap();
    assert_eq!(d[10], b'x');
    assert_eq!(d.iter().filter(|&&b| b != 0).count(), 1);
    // Allocate past the end without changing the size; then extend.
    f.fallocate(8 * BS, 4 * BS, FallocMode::Allocate { keep_size: true })
        .await
        .unwrap();
    assert_eq!(v.getattr(ino).await.unwrap().size, 8 * BS);
    f.fallocate(8 * BS, 4 * BS, FallocMode::Allocate { keep_size: false })
        .await
        .unwrap();
    assert_eq!(v.getattr(ino).await.unwrap().size, 12 * BS);
    assert!(
        f.read(8 * BS, 4 * BS as usize)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(f.seek_data(12 * BS).await.unwrap(), None);
    f.fsync().await.unwrap();
    fsck(&c);
}

#[tokio::test]
async fn enospc_is_clean_and_keeps_what_was_written() {
    let (c, lun) = cluster(64);
    let (v, _) = node(&c, 1, &lun).await;
    let ino = mkfile(&v, "full").await;
    let (f, _) = v.open_file(ino, true).await.unwrap();
    let mut off = 0u64;
    let err = loop {
        match f
            .write(off, Bytes::from(vec![(off / BS) as u8 + 1; BS as usize]))
            .await
        {
            Ok(_) => off += BS,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, VolumeError::Meta(MetaError::NoSpace)),
        "{err:?}"
    );
    assert_eq!(off, 63 * BS);
    f.fsync().await.unwrap();
    for b in 0..63u64 {
        let d = f.read(b * BS, BS as usize).await.unwrap();
        assert!(d.iter().all(|&x| x == b as u8 + 1));
    }
    // Overwrites still work on a full volume.
    f.write(0, Bytes::from(vec![0xAA; 10])).await.unwrap();
    f.fsync().await.unwrap();
    fsck(&c);
}

#[tokio::test]
async fn a_node_without_a_lease_cannot_write() {
    let (c, lun) = cluster(256);
    let (v, meta) = node(&c, 1, &lun).await;
    let ino = mkfile(&v, "fenced").await;
    let (f, _) = v.open_file(ino, true).await.unwrap();
    f.write(0, Bytes::from(vec![1u8; 100])).await.unwrap();
    f.fsync().await.unwrap();
    meta.lose_lease();
    let e = f.write(0, Bytes::from(vec![2u8; 100])).await.unwrap_err();
    assert!(matches!(e, VolumeError::Fenced), "{e:?}");
    let d = lun.read_at(0, 256 * BS as usize).await.unwrap();
    assert!(!d.contains(&2), "a fenced node wrote the LUN");
}

#[tokio::test]
async fn a_write_rides_out_a_brief_lease_gap_and_is_fenced_under_a_new_session() {
    let (c, lun) = cluster(256);
    let (v, meta) = node(&c, 1, &lun).await;
    let ino = mkfile(&v, "gap").await;
    let (f, _) = v.open_file(ino, true).await.unwrap();
    f.write(0, Bytes::from(vec![1u8; 100])).await.unwrap();
    f.fsync().await.unwrap();

    // The lease lapses and a keep-alive restores it 300 ms later: the write waits for it.
    let session = meta.lose_lease().unwrap();
    let m = meta.clone();
    let back = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        m.regain_lease(session);
    });
    let t0 = std::time::Instant::now();
    f.write(0, Bytes::from(vec![2u8; 100])).await.unwrap();
    f.fsync().await.unwrap();
    assert!(t0.elapsed() >= std::time::Duration::from_millis(250));
    back.await.unwrap();
    assert!(f.read(0, 100).await.unwrap().iter().all(|&x| x == 2));

    // The old session is gone and a new one opened (which releases the old one's locks):
    // the next write is not issued under the lock of the old session, it takes the lock
    // again, under the new session and with a newer token.
    let key = csv_core::meta::data_lock_key(ino);
    let old = c.read(|s| s.lock(&key)).unwrap().holders[0].clone();
    assert_eq!(old.session, session);
    meta.lose_lease();
    let new_session = meta.reopen_session(10_000).unwrap();
    f.write(0, Bytes::from(vec![3u8; 100])).await.unwrap();
    let now = c.read(|s| s.lock(&key)).unwrap().holders[0].clone();
    assert_eq!(now.session, new_session);
    assert!(now.token > old.token, "{now:?} after {old:?}");
}

#[tokio::test]
async fn unlink_and_rename_over_free_the_blocks_and_removed_files_are_stale() {
    let (c, lun) = cluster(256);
    let (a, _) = node(&c, 1, &lun).await;
    let (b, _) = node(&c, 2, &lun).await;
    let x = mkfile(&a, "x").await;
    let y = mkfile(&a, "y").await;
    for ino in [x, y] {
        let (f, _) = a.open_file(ino, true).await.unwrap();
        f.write(0, Bytes::from(vec![3u8; 10 * BS as usize]))
            .await
            .unwrap();
        f.fsync().await.unwrap();
        f.release();
    }
    let (fb, _) = b.open_file(x, false).await.unwrap();
    assert_eq!(fb.read(0, 10).await.unwrap()[..], [3u8; 10]);
    // Node 1 removes x while node 2 holds it open: node 2 gives its lock up.
    a.unlink(ROOT_INO, "x").await.unwrap();
    let e = fb.read(0, 10).await.unwrap_err();
    assert!(matches!(e, VolumeError::Stale(_)), "{e:?}");
    a.rename(ROOT_INO, "y", ROOT_INO, "z", 0).await.unwrap();
    let z = mkfile(&a, "w").await;
    a.rename(ROOT_INO, "w", ROOT_INO, "z", 0).await.unwrap();
    assert_eq!(a.lookup(ROOT_INO, "z").await.unwrap().ino, z);
    let e = a.lookup(ROOT_INO, &"n".repeat(256)).await.unwrap_err();
    assert!(matches!(e, VolumeError::Meta(MetaError::NameTooLong)));
    let e = a.lookup(ROOT_INO, "a/b").await.unwrap_err();
    assert!(matches!(e, VolumeError::Meta(MetaError::InvalidName)));
    // Give the background release a moment, then every block is free or reserved.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let space = c.read(|s| s.space());
    assert_eq!(space.free_blocks + space.reserved_blocks, 255);
    fsck(&c);
}

#[tokio::test]
async fn writes_past_the_maximum_file_size_fail_with_efbig() {
    let (c, lun) = cluster(64);
    let (v, _) = node(&c, 1, &lun).await;
    let ino = mkfile(&v, "big").await;
    let (f, _) = v.open_file(ino, true).await.unwrap();
    let max = csv_core::meta::MAX_FILE_SIZE;
    let e = f
        .write(max - 1, Bytes::from_static(b"ab"))
        .await
        .unwrap_err();
    assert!(matches!(e, VolumeError::Meta(MetaError::FileTooBig)));
    // A sparse file of 1 TiB costs nothing.
    f.write((1 << 40) - 1, Bytes::from_static(b"z"))
        .await
        .unwrap();
    f.fsync().await.unwrap();
    let a = v.getattr(ino).await.unwrap();
    assert_eq!((a.size, a.blocks), (1 << 40, 1));
    fsck(&c);
}

mod model {
    //! Random write/truncate/punch/zero/fsync/crash sequences against a `Vec<u8>`.
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Step {
        Write { off: u64, len: u64, byte: u8 },
        Truncate(u64),
        Punch { off: u64, len: u64 },
        Zero { off: u64, len: u64 },
        Fsync,
        Crash,
    }

    const SPAN: u64 = 24 * BS;
    /// The byte of the neighbour file whose freed blocks get reused: it must never
    /// show up in the file under test.
    const FOREIGN: u8 = 0xEE;

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0..SPAN, 1..3 * BS, 1u8..200).prop_map(|(off, len, byte)| Step::Write { off, len, byte }),
            1 => (0..SPAN).prop_map(Step::Truncate),
            1 => (0..SPAN, 1..4 * BS).prop_map(|(off, len)| Step::Punch { off, len }),
            1 => (0..SPAN, 1..4 * BS).prop_map(|(off, len)| Step::Zero { off, len }),
            2 => Just(Step::Fsync),
            1 => Just(Step::Crash),
        ]
    }

    /// Per byte: the value as of the last fsync, plus what it may be after a crash.
    struct Model {
        current: Vec<u8>,
        durable: Vec<u8>,
        maybe: HashMap<usize, Vec<u8>>,
    }

    impl Model {
        fn touch(&mut self, range: std::ops::Range<usize>, value: u8) {
            for i in range {
                self.maybe.entry(i).or_default().push(value);
            }
        }
        fn set(&mut self, off: u64, len: u64, value: u8) {
            let (a, b) = (off as usize, (off + len) as usize);
            if self.current.len() < b {
                let old = self.current.len();
                self.current.resize(b, 0);
                self.touch(old..b, 0);
            }
            self.current[a..b].fill(value);
            self.touch(a..b, value);
        }
        fn resize(&mut self, n: u64) {
            let n = n as usize;
            let old = self.current.len();
            self.current.resize(n, 0);
            self.touch(n.min(old)..n.max(old), 0);
        }
        fn synced(&mut self) {
            self.durable = self.current.clone();
            self.maybe.clear();
        }
        fn check_after_crash(&mut self, got: &[u8]) -> Result<(), String> {
            for (i, &b) in got.iter().enumerate() {
                let ok = self.durable.get(i).copied() == Some(b)
                    || (i >= self.durable.len() && b == 0)
                    || self.maybe.get(&i).is_some_and(|v| v.contains(&b));
                if !ok || b == FOREIGN {
                    return Err(format!(
                        "byte {i} is {b:#x} after the crash (durable {:?})",
                        self.durable.get(i)
                    ));
                }
            }
            for i in got.len()..self.durable.len() {
                if !self.maybe.contains_key(&i) {
                    return Err(format!(
                        "fsync'd byte {i} lost (file is {} bytes)",
                        got.len()
                    ));
                }
            }
            self.current = got.to_vec();
            self.synced();
            Ok(())
        }
    }

    async fn run(steps: Vec<Step>) -> Result<(), String> {
        let (c, lun) = cluster(512);
        let mut id = 1;
        let (mut v, mut meta) = node(&c, id, &lun).await;
        // A neighbour file whose blocks are freed and then reused by the file under test.
        let n = mkfile(&v, "neighbour").await;
        let (fnb, _) = v.open_file(n, true).await.unwrap();
        fnb.write(0, Bytes::from(vec![FOREIGN; 64 * BS as usize]))
            .await
            .unwrap();
        fnb.fsync().await.unwrap();
        fnb.release();
        v.unlink(ROOT_INO, "neighbour").await.unwrap();
        let ino = mkfile(&v, "f").await;
        let (mut f, _) = v.open_file(ino, true).await.unwrap();
        let mut m = Model {
            current: Vec::new(),
            durable: Vec::new(),
            maybe: HashMap::new(),
        };
        for (k, s) in steps.into_iter().enumerate() {
            match s {
                Step::Write { off, len, byte } => {
                    f.write(off, Bytes::from(vec![byte; len as usize]))
                        .await
                        .map_err(|e| e.to_string())?;
                    m.set(off, len, byte);
                }
                Step::Truncate(n) => {
                    v.setattr(
                        ino,
                        csv_core::volume::SetAttr {
                            size: Some(n),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    m.resize(n);
                }
                Step::Punch { off, len } => {
                    f.fallocate(off, len, FallocMode::PunchHole)
                        .await
                        .map_err(|e| e.to_string())?;
                    let end = (off + len).min(m.current.len() as u64);
                    if off < end {
                        m.set(off, end - off, 0);
                    }
                }
                Step::Zero { off, len } => {
                    f.fallocate(off, len, FallocMode::ZeroRange { keep_size: false })
                        .await
                        .map_err(|e| e.to_string())?;
                    m.set(off, len, 0);
                }
                Step::Fsync => {
                    f.fsync().await.map_err(|e| e.to_string())?;
                    m.synced();
                }
                Step::Crash => {
                    meta.lose_lease();
                    lun.crash();
                    drop(f);
                    drop(v);
                    let old = meta
                        .cluster()
                        .read(|s| s.sessions().find(|x| x.node == id).map(|x| x.id));
                    if let Some(old) = old {
                        c.apply(Op::CloseSession { session: old });
                    }
                    id += 1;
                    (v, meta) = node(&c, id, &lun).await;
                    let (nf, attr) = v.open_file(ino, true).await.map_err(|e| e.to_string())?;
                    f = nf;
                    let got = f
                        .read(0, attr.size as usize)
                        .await
                        .map_err(|e| e.to_string())?;
                    m.check_after_crash(&got)
                        .map_err(|e| format!("step {k}: {e}"))?;
                }
            }
            let got = f
                .read(0, SPAN as usize * 2)
                .await
                .map_err(|e| e.to_string())?;
            if got[..] != m.current[..] {
                let first = got.iter().zip(&m.current).position(|(a, b)| a != b);
                return Err(format!(
                    "step {k}: content differs (len {} vs {}, first at {first:?})",
                    got.len(),
                    m.current.len()
                ));
            }
        }
        f.fsync().await.map_err(|e| e.to_string())?;
        c.read(|s| s.check_invariants())
            .map_err(|e| format!("fsck: {e:?}"))?;
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn file_matches_the_model_and_survives_crashes(steps in proptest::collection::vec(step(), 1..30)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let r = rt.block_on(run(steps));
            prop_assert!(r.is_ok(), "{}", r.unwrap_err());
        }
    }
}

#[tokio::test]
async fn a_revoked_handle_never_takes_the_data_lock_back_and_surrender_hands_over_its_writes() {
    let (c, lun) = cluster(2048);
    let (a, _) = node(&c, 1, &lun).await;
    let (b, _) = node(&c, 2, &lun).await;
    let ino = mkfile(&a, "vm.img").await;
    let (fa, _) = a.open_file(ino, true).await.unwrap();
    let (fb, _) = b.open_file(ino, true).await.unwrap();
    let token_a = fa.lock_for_write().await.unwrap();
    assert_eq!(fa.write_token(), Some(token_a));
    fa.write(0, Bytes::from(vec![7u8; 3 * BS as usize]))
        .await
        .unwrap();
    // The handoff: revoke, then commit + flush + release in one step.
    fa.revoke_writes();
    let refused = fa.write(0, Bytes::from_static(b"late")).await;
    assert!(matches!(refused, Err(VolumeError::WriteRevoked(i)) if i == ino));
    fa.surrender().await.unwrap();
    assert_eq!(fa.write_token(), None);
    // The new owner sees every write of the old one and gets a newer token.
    let token_b = fb.lock_for_write().await.unwrap();
    assert!(token_b > token_a);
    assert_eq!(
        &fb.read(0, 3 * BS as usize).await.unwrap()[..],
        &vec![7u8; 3 * BS as usize][..]
    );
    // The revoked handle still reads, but never writes or re-acquires, in any form.
    assert!(matches!(
        fa.write(BS, Bytes::from_static(b"x")).await,
        Err(VolumeError::WriteRevoked(_))
    ));
    assert!(matches!(
        fa.set_len(0).await,
        Err(VolumeError::WriteRevoked(_))
    ));
    assert!(matches!(
        fa.fallocate(0, BS, FallocMode::PunchHole).await,
        Err(VolumeError::WriteRevoked(_))
    ));
    assert!(matches!(
        fa.lock_for_write().await,
        Err(VolumeError::WriteRevoked(_))
    ));
    assert_eq!(fb.write_token(), Some(token_b), "B kept its grant");
    assert_eq!(fa.read(0, 4).await.unwrap(), Bytes::from_static(&[7u8; 4]));
    fsck(&c);
}
