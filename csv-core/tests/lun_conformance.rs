//! Every LUN backend passes the same conformance suite (`csv_core::lun::conformance`), and
//! MemLun/FileLun match a `Vec<u8>` reference disk under random operations.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use csv_core::lun::conformance::{self, pattern};
use csv_core::lun::{
    CacheMode, FaultLun, FileLun, FileLunOptions, Lun, LunError, MemLun, NbdLun, NbdOptions,
};
use proptest::prelude::*;

const SIZE: u64 = 4 << 20;

fn file_lun(dir: &tempfile::TempDir, direct: bool) -> std::io::Result<FileLun> {
    let path = common::image(dir.path(), SIZE);
    FileLun::open(
        &path,
        FileLunOptions {
            cache: if direct {
                CacheMode::Direct
            } else {
                CacheMode::Buffered
            },
            read_only: false,
        },
    )
}

#[tokio::test]
async fn mem_lun_conforms() {
    conformance::run_all(Arc::new(MemLun::new(SIZE)))
        .await
        .unwrap();
    conformance::run_all(Arc::new(MemLun::with_alignment(SIZE, 4096)))
        .await
        .unwrap();
}

#[tokio::test]
async fn file_lun_buffered_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance::run_all(Arc::new(file_lun(&dir, false).unwrap()))
        .await
        .unwrap();
}

#[tokio::test]
async fn file_lun_direct_conforms() {
    let dir = tempfile::tempdir().unwrap();
    match file_lun(&dir, true) {
        Ok(lun) => {
            assert_eq!(lun.alignment(), 4096);
            conformance::run_all(Arc::new(lun)).await.unwrap();
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            println!(
                "skipping O_DIRECT: the file system of {:?} refuses it: {e}",
                dir.path()
            );
        }
        Err(e) => panic!("opening with O_DIRECT failed: {e}"),
    }
}

#[tokio::test]
async fn fault_lun_without_faults_conforms() {
    let lun = FaultLun::new(MemLun::new(SIZE));
    let handle = lun.handle();
    conformance::run_all(Arc::new(lun)).await.unwrap();
    assert_eq!(handle.injected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_lun_against_nbdkit_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let img = common::image(dir.path(), SIZE);
    let _t = common::Target::nbdkit_unix(dir.path(), &img, &[], &[]);
    let lun = NbdLun::connect(&_t.uri, NbdOptions::default())
        .await
        .unwrap();
    conformance::run_all(Arc::new(lun)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_lun_against_qemu_nbd_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let img = common::image(dir.path(), SIZE);
    let _t = common::Target::qemu_nbd_unix(dir.path(), &img);
    let lun = NbdLun::connect(&_t.uri, NbdOptions::default())
        .await
        .unwrap();
    assert!(lun.export_info().structured);
    conformance::run_all(Arc::new(lun)).await.unwrap();
}

/// One step of the model-based test, in units of the LUN's alignment.
#[derive(Debug, Clone)]
enum Op {
    Write {
        blk: u64,
        n: u64,
        seed: u8,
        fua: bool,
    },
    Read {
        blk: u64,
        n: u64,
    },
    Zero {
        blk: u64,
        n: u64,
    },
    Discard {
        blk: u64,
        n: u64,
    },
    Flush,
    WritePastEnd {
        n: u64,
    },
}

const MODEL_BLOCKS: u64 = 64;

fn arb_op() -> impl Strategy<Value = Op> {
    let range = (0..MODEL_BLOCKS).prop_flat_map(|blk| (Just(blk), 1..=(MODEL_BLOCKS - blk).min(9)));
    prop_oneof![
        4 => (range.clone(), any::<u8>(), any::<bool>())
            .prop_map(|((blk, n), seed, fua)| Op::Write { blk, n, seed, fua }),
        3 => range.clone().prop_map(|(blk, n)| Op::Read { blk, n }),
        1 => range.clone().prop_map(|(blk, n)| Op::Zero { blk, n }),
        1 => range.prop_map(|(blk, n)| Op::Discard { blk, n }),
        1 => Just(Op::Flush),
        1 => (2u64..4).prop_map(|n| Op::WritePastEnd { n }),
    ]
}

/// Applies `ops` to `lun` and to a `Vec<u8>` reference, comparing every read.
async fn check_against_model(lun: &dyn Lun, ops: &[Op]) {
    let a = u64::from(lun.alignment());
    let size = lun.size();
    let mut model = vec![0u8; size as usize];
    let span = |blk: u64, n: u64| ((blk * a) as usize, (n * a) as usize);
    for op in ops {
        match *op {
            Op::Write { blk, n, seed, fua } => {
                let (off, len) = span(blk, n);
                let data = pattern(seed, len);
                lun.write_at(off as u64, data.clone(), fua).await.unwrap();
                model[off..off + len].copy_from_slice(&data);
            }
            Op::Read { blk, n } => {
                let (off, len) = span(blk, n);
                let got = lun.read_at(off as u64, len).await.unwrap();
                assert!(
                    got[..] == model[off..off + len],
                    "{op:?} differs from the model"
                );
            }
            Op::Zero { blk, n } => {
                let (off, len) = span(blk, n);
                lun.write_zeroes(off as u64, len as u64).await.unwrap();
                model[off..off + len].fill(0);
            }
            Op::Discard { blk, n } => {
                let (off, len) = span(blk, n);
                lun.discard(off as u64, len as u64).await.unwrap();
                let got = lun.read_at(off as u64, len).await.unwrap();
                for (i, (&g, m)) in got.iter().zip(&mut model[off..off + len]).enumerate() {
                    assert!(g == *m || g == 0, "{op:?}: byte {i} neither old nor zero");
                    *m = g;
                }
            }
            Op::Flush => lun.flush().await.unwrap(),
            Op::WritePastEnd { n } => {
                let off = size - a;
                let res = lun
                    .write_at(off, Bytes::from(vec![0xee; (n * a) as usize]), false)
                    .await;
                assert!(matches!(res, Err(LunError::OutOfRange { .. })), "{res:?}");
            }
        }
    }
    let all = lun.read_at(0, size as usize).await.unwrap();
    assert!(all[..] == model[..], "final contents differ from the model");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn mem_lun_matches_model(ops in proptest::collection::vec(arb_op(), 1..40)) {
        block_on(check_against_model(&MemLun::new(MODEL_BLOCKS * 512), &ops));
    }

    #[test]
    fn file_lun_matches_model(ops in proptest::collection::vec(arb_op(), 1..40), direct in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let a = if direct { 4096 } else { 512 };
        let path = common::image(dir.path(), MODEL_BLOCKS * a);
        let cache = if direct { CacheMode::Direct } else { CacheMode::Buffered };
        let lun = match FileLun::open(&path, FileLunOptions { cache, read_only: false }) {
            Ok(l) => l,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                println!("skipping O_DIRECT case: {e}");
                return Ok(());
            }
            Err(e) => panic!("{e}"),
        };
        block_on(check_against_model(&lun, &ops));
    }
}
