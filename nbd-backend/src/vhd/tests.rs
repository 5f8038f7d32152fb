//! VHD device tests over real files (FileBacking), with a recording wrapper to check the
//! crash-safe allocation order.

use std::io;
use std::sync::Mutex;

use super::dynamic::{DynamicHeader, HEADER_LEN, encode_bat};
use super::footer::{DISK_DIFFERENCING, DISK_DYNAMIC, DISK_FIXED, Footer, Geometry};
use super::*;
use crate::export::FileBacking;

const MIB: u64 = 1 << 20;

fn footer(disk_type: u32, size: u64) -> Footer {
    Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: if disk_type == DISK_FIXED {
            NO_DATA_OFFSET
        } else {
            512
        },
        timestamp: 0,
        creator_app: *b"qem2",
        creator_version: 0x0005_0003,
        creator_os: 0x5769_326b,
        original_size: size,
        current_size: size,
        geometry: Geometry {
            cylinders: 65535,
            heads: 16,
            sectors: 255,
        },
        disk_type,
        unique_id: [7; 16],
        saved_state: 0,
    }
}

/// A dynamic VHD laid out like qemu does: footer copy @0, header @512, BAT @1536, footer @EOF.
fn dynamic_image(size: u64, block_size: u32, disk_type: u32) -> Vec<u8> {
    let entries = size.div_ceil(block_size as u64) as u32;
    let f = footer(disk_type, size).encode();
    let h = DynamicHeader {
        data_offset: u64::MAX,
        table_offset: 1536,
        header_version: 0x0001_0000,
        max_table_entries: entries,
        block_size,
        parent_fields: vec![0; HEADER_LEN - 40],
    };
    let mut img = Vec::new();
    img.extend_from_slice(&f);
    img.extend_from_slice(&h.encode());
    img.extend_from_slice(&encode_bat(&vec![UNALLOCATED; entries as usize]));
    img.extend_from_slice(&f);
    img
}

fn file_with(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn backing(path: &std::path::Path) -> Arc<FileBacking> {
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    Arc::new(FileBacking::new(f).unwrap())
}

async fn read_all(dev: &dyn BlockDevice, offset: u64, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for c in dev.read(offset, len).await.unwrap() {
        match c {
            ReadChunk::Data { data, .. } => out.extend_from_slice(&data),
            ReadChunk::Hole { len, .. } => out.resize(out.len() + len as usize, 0),
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Write(u64, usize),
    Flush,
    SetSize(u64),
}

/// Records the order of operations reaching the file.
struct Recording {
    inner: Arc<FileBacking>,
    ops: Mutex<Vec<Op>>,
}

impl Recording {
    fn log(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }
}

impl BackingFile for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        self.inner.read_at(offset, len)
    }
    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        self.log(Op::Write(offset, data.len()));
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        self.log(Op::Flush);
        self.inner.flush()
    }
    fn set_size(&self, new_size: u64) -> BoxFuture<'_, io::Result<()>> {
        self.log(Op::SetSize(new_size));
        self.inner.set_size(new_size)
    }
}

#[tokio::test]
async fn first_write_allocates_in_crash_safe_order() {
    let (_d, path) = file_with(&dynamic_image(8 * MIB, 2 << 20, DISK_DYNAMIC));
    let rec = Arc::new(Recording {
        inner: backing(&path),
        ops: Mutex::new(Vec::new()),
    });
    let dev = open(rec.clone(), false).await.unwrap();
    assert_eq!(dev.size(), 8 * MIB);
    dev.write(2 * MIB + 4096, Bytes::from(vec![0xab; 512]), false)
        .await
        .unwrap();
    // Old EOF footer at 2048: bitmap there, data at 2560, new footer at 2560 + 2 MiB.
    let new_footer = 2048 + 512 + 2 * MIB;
    assert_eq!(
        *rec.ops.lock().unwrap(),
        vec![
            Op::Write(2048, 512),
            Op::Flush,
            Op::SetSize(new_footer + 512),
            Op::Write(new_footer, 512),
            Op::Flush,
            Op::Write(1536 + 4, 4),
            Op::Flush,
            Op::Write(2560 + 4096, 512),
        ]
    );
    // Partial write: the rest of the new block reads as zeros.
    let got = read_all(dev.as_ref(), 2 * MIB, 8192).await;
    assert_eq!(&got[..4096], &[0u8; 4096][..]);
    assert_eq!(&got[4096..4608], &[0xab; 512][..]);
    assert!(got[4608..].iter().all(|b| *b == 0));
    // The file is a valid VHD again, with the footer at EOF.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, new_footer + 512);
    Footer::parse(&bytes[bytes.len() - 512..]).unwrap();
}

#[tokio::test]
async fn concurrent_first_writes_to_one_block_allocate_it_once() {
    let (_d, path) = file_with(&dynamic_image(8 * MIB, 2 << 20, DISK_DYNAMIC));
    let rec = Arc::new(Recording {
        inner: backing(&path),
        ops: Mutex::new(Vec::new()),
    });
    let dev = open(rec.clone(), false).await.unwrap();
    let writes = (0..8u8).map(|i| {
        let dev = dev.clone();
        tokio::spawn(async move {
            dev.write(i as u64 * 65536, Bytes::from(vec![i + 1; 65536]), false)
                .await
        })
    });
    for w in writes {
        w.await.unwrap().unwrap();
    }
    let bat_writes = rec
        .ops
        .lock()
        .unwrap()
        .iter()
        .filter(|op| matches!(op, Op::Write(o, 4) if (1536..2048).contains(o)))
        .count();
    assert_eq!(bat_writes, 1);
    for i in 0..8u8 {
        let got = read_all(dev.as_ref(), i as u64 * 65536, 65536).await;
        assert!(got.iter().all(|b| *b == i + 1));
    }
}

#[tokio::test]
async fn data_survives_reopen_and_status_reports_allocation() {
    let (_d, path) = file_with(&dynamic_image(6 * MIB + 4096, 1 << 20, DISK_DYNAMIC));
    {
        let dev = open(backing(&path), false).await.unwrap();
        // Spans blocks 2 and 3.
        let data: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
        dev.write(2 * MIB + MIB / 2, Bytes::from(data), true)
            .await
            .unwrap();
        dev.flush().await.unwrap();
    }
    let dev = open(backing(&path), false).await.unwrap();
    assert_eq!(dev.size(), 6 * MIB + 4096);
    let got = read_all(dev.as_ref(), 2 * MIB + MIB / 2, MIB as u32).await;
    assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    let st = dev.block_status(0, (6 * MIB) as u32).await.unwrap();
    let flags: Vec<u32> = st.iter().map(|e| e.flags).collect();
    assert_eq!(flags, vec![3, 3, 0, 0, 3, 3]);
    // Holes come back as holes.
    let chunks = dev.read(0, 4096).await.unwrap();
    assert_eq!(
        chunks,
        vec![ReadChunk::Hole {
            offset: 0,
            len: 4096
        }]
    );
    // Zeroing an allocated range reads back as zero; unallocated ranges need nothing.
    dev.write_zeroes(2 * MIB + MIB / 2, 4096, ZeroMode::default())
        .await
        .unwrap();
    assert_eq!(
        read_all(dev.as_ref(), 2 * MIB + MIB / 2, 4096).await,
        vec![0; 4096]
    );
    let fast = ZeroMode {
        fast_only: true,
        ..ZeroMode::default()
    };
    dev.write_zeroes(0, MIB, fast).await.unwrap();
    assert!(matches!(
        dev.write_zeroes(2 * MIB, MIB, fast).await,
        Err(DeviceError::FastZeroUnsupported)
    ));
}

#[tokio::test]
async fn crash_after_bitmap_write_is_recovered_from_the_footer_copy() {
    let mut img = dynamic_image(4 * MIB, 2 << 20, DISK_DYNAMIC);
    // Step 1 of an allocation happened (bitmap over the EOF footer), nothing else.
    let len = img.len();
    img[len - 512..].fill(0xff);
    let (_d, path) = file_with(&img);
    let dev = open(backing(&path), false).await.unwrap();
    assert_eq!(read_all(dev.as_ref(), 0, 4096).await, vec![0; 4096]);
    dev.write(0, Bytes::from(vec![1u8; 4096]), true)
        .await
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    Footer::parse(&bytes[bytes.len() - 512..]).unwrap();
    let dev = open(backing(&path), false).await.unwrap();
    assert_eq!(read_all(dev.as_ref(), 0, 4096).await, vec![1; 4096]);
}

#[tokio::test]
async fn fixed_vhd_serves_the_data_region_only() {
    let mut img = vec![0x5au8; 2 * MIB as usize];
    img.extend_from_slice(&footer(DISK_FIXED, 2 * MIB).encode());
    let (_d, path) = file_with(&img);
    let dev = open(backing(&path), false).await.unwrap();
    assert_eq!(dev.size(), 2 * MIB);
    assert_eq!(
        read_all(dev.as_ref(), 2 * MIB - 512, 512).await,
        vec![0x5a; 512]
    );
}

async fn open_err(img: &[u8]) -> VhdError {
    let (_d, path) = file_with(img);
    match open(backing(&path), false).await {
        Ok(_) => panic!("opened a bad VHD"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn bad_images_are_refused_with_clear_errors() {
    // Fixed, footer checksum broken.
    let mut img = vec![0u8; MIB as usize];
    img.extend_from_slice(&footer(DISK_FIXED, MIB).encode());
    let n = img.len();
    img[n - 512 + 48] ^= 1;
    let e = open_err(&img).await;
    assert!(matches!(e, VhdError::FooterChecksum { .. }), "{e}");
    assert!(e.to_string().contains("checksum"));
    // Fixed, declares more than it holds.
    let mut img = vec![0u8; MIB as usize];
    img.extend_from_slice(&footer(DISK_FIXED, 2 * MIB).encode());
    assert!(matches!(
        open_err(&img).await,
        VhdError::FixedTooSmall { .. }
    ));
    // Dynamic, both footers broken.
    let mut img = dynamic_image(4 * MIB, 2 << 20, DISK_DYNAMIC);
    let n = img.len();
    img[20] ^= 1;
    img[n - 500] ^= 1;
    assert!(matches!(
        open_err(&img).await,
        VhdError::FooterChecksum { .. }
    ));
    // Dynamic header checksum broken.
    let mut img = dynamic_image(4 * MIB, 2 << 20, DISK_DYNAMIC);
    img[512 + 30] ^= 1;
    assert!(matches!(
        open_err(&img).await,
        VhdError::HeaderChecksum { .. }
    ));
    // Differencing disks are unsupported, and say so.
    let e = open_err(&dynamic_image(4 * MIB, 2 << 20, DISK_DIFFERENCING)).await;
    assert!(matches!(e, VhdError::Differencing), "{e}");
    assert!(e.to_string().contains("differencing"));
    // Too small to be anything.
    assert!(matches!(
        open_err(&[0u8; 100]).await,
        VhdError::FileTooSmall(100)
    ));
    // Raw bytes, no cookie.
    assert!(matches!(
        open_err(&[0u8; 4096]).await,
        VhdError::BadFooterCookie
    ));
}
