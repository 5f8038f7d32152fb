//! The conformance suite every [`Lun`] backend must pass (test support, used by
//! `tests/lun_conformance.rs` and by any crate that adds a backend or a wrapper).
//!
//! Each check destroys the LUN's contents and needs a LUN of at least [`MIN_SIZE`] bytes.
//! Checks `assert!` on a broken contract (like any test) and return `Err` only when the
//! backend itself fails a request that should have succeeded.
//!
//! What is checked (the invariants of the [`Lun`] trait):
//! - requests outside `[0, size)` fail with `OutOfRange`, including offsets that overflow,
//!   and do not change the LUN;
//! - misaligned offsets and lengths fail with `Misaligned`;
//! - reads return what was written (FUA or not, first and last block, large requests);
//! - `write_zeroes` zeros exactly its range; `discard` leaves old data or zeros in its range
//!   and leaves neighbours alone;
//! - `flush` succeeds; zero-length requests succeed;
//! - concurrent writes to disjoint ranges all land.

use std::sync::Arc;

use bytes::Bytes;

use super::{Lun, LunError};

/// Smallest LUN the suite accepts.
pub const MIN_SIZE: u64 = 1 << 20;

/// Deterministic, position-dependent bytes (a misplaced block is detected).
pub fn pattern(seed: u8, len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect::<Vec<u8>>()
        .into()
}

/// Runs every check on `lun`.
pub async fn run_all(lun: Arc<dyn Lun>) -> Result<(), LunError> {
    geometry(&*lun);
    out_of_range(&*lun).await?;
    misaligned(&*lun).await?;
    read_after_write(&*lun).await?;
    zeroes(&*lun).await?;
    discard(&*lun).await?;
    flush(&*lun).await?;
    concurrent_disjoint_writes(lun).await
}

/// Size and alignment are sane.
pub fn geometry(lun: &dyn Lun) {
    let a = lun.alignment();
    assert!(a.is_power_of_two() && a >= 512, "alignment {a}");
    assert!(
        lun.size() >= MIN_SIZE,
        "LUN of {} bytes is too small",
        lun.size()
    );
    assert!(!lun.describe().is_empty());
}

fn expect_out_of_range<T: std::fmt::Debug>(what: &str, res: Result<T, LunError>) {
    match res {
        Err(LunError::OutOfRange { .. }) => {}
        other => panic!("{what}: expected OutOfRange, got {other:?}"),
    }
}

fn expect_misaligned<T: std::fmt::Debug>(what: &str, res: Result<T, LunError>) {
    match res {
        Err(LunError::Misaligned { .. }) => {}
        other => panic!("{what}: expected Misaligned, got {other:?}"),
    }
}

/// Requests past the end fail with `OutOfRange` and change nothing.
pub async fn out_of_range(lun: &dyn Lun) -> Result<(), LunError> {
    let a = u64::from(lun.alignment());
    let size = lun.size();
    let last = size - a;
    lun.write_at(last, pattern(1, a as usize), false).await?;
    expect_out_of_range("read at size", lun.read_at(size, a as usize).await);
    expect_out_of_range("read across end", lun.read_at(last, 2 * a as usize).await);
    expect_out_of_range(
        "write across end",
        lun.write_at(last, pattern(2, 2 * a as usize), false).await,
    );
    expect_out_of_range(
        "write at overflowing offset",
        lun.write_at(u64::MAX - a + 1, pattern(2, a as usize), false)
            .await,
    );
    expect_out_of_range("zeroes across end", lun.write_zeroes(last, 2 * a).await);
    expect_out_of_range("discard across end", lun.discard(last, 2 * a).await);
    expect_out_of_range(
        "zeroes at overflowing offset",
        lun.write_zeroes(u64::MAX - a + 1, 2 * a).await,
    );
    assert_eq!(
        lun.read_at(last, a as usize).await?,
        pattern(1, a as usize),
        "a refused request changed the last block"
    );
    assert!(lun.read_at(size, 0).await?.is_empty());
    Ok(())
}

/// Misaligned offsets and lengths fail with `Misaligned`.
pub async fn misaligned(lun: &dyn Lun) -> Result<(), LunError> {
    let a = lun.alignment() as usize;
    expect_misaligned("read at odd offset", lun.read_at(1, a).await);
    expect_misaligned("read of odd length", lun.read_at(0, a + 1).await);
    expect_misaligned(
        "write at half-alignment offset",
        lun.write_at(a as u64 / 2, pattern(3, a), false).await,
    );
    expect_misaligned(
        "write of odd length",
        lun.write_at(0, pattern(3, a - 1), false).await,
    );
    expect_misaligned("zeroes of odd length", lun.write_zeroes(0, 7).await);
    expect_misaligned("discard at odd offset", lun.discard(3, a as u64).await);
    Ok(())
}

/// Reads return what was written.
pub async fn read_after_write(lun: &dyn Lun) -> Result<(), LunError> {
    let a = lun.alignment() as usize;
    let size = lun.size();
    let cases: [(u64, usize, bool); 5] = [
        (0, a, false),
        (a as u64, 8 * a, true),
        (size - a as u64, a, true),
        (size / 2, 256 << 10, false),
        (size / 4, 3 * a, false),
    ];
    for (i, &(off, len, fua)) in cases.iter().enumerate() {
        lun.write_at(off, pattern(10 + i as u8, len), fua).await?;
    }
    for (i, &(off, len, _)) in cases.iter().enumerate() {
        let got = lun.read_at(off, len).await?;
        assert_eq!(got.len(), len);
        assert!(
            got == pattern(10 + i as u8, len),
            "read at {off}+{len} differs from what was written"
        );
    }
    // An overwrite of part of a range replaces exactly that part.
    lun.write_at(a as u64 * 2, pattern(99, a), false).await?;
    let got = lun.read_at(a as u64, 8 * a).await?;
    let mut want = pattern(11, 8 * a).to_vec();
    want[a..2 * a].copy_from_slice(&pattern(99, a));
    assert!(got == want, "partial overwrite");
    Ok(())
}

/// `write_zeroes` zeros exactly its range.
pub async fn zeroes(lun: &dyn Lun) -> Result<(), LunError> {
    let a = lun.alignment() as usize;
    let base = lun.size() / 8;
    lun.write_at(base, pattern(20, 64 * a), false).await?;
    lun.write_zeroes(base + a as u64, 32 * a as u64).await?;
    let got = lun.read_at(base, 64 * a).await?;
    let want = pattern(20, 64 * a);
    assert!(got[..a] == want[..a], "zeroes clobbered the block before");
    assert!(
        got[a..33 * a].iter().all(|&b| b == 0),
        "zeroed range is not zero"
    );
    assert!(got[33 * a..] == want[33 * a..], "zeroes clobbered after");
    lun.write_zeroes(base, 0).await?;
    Ok(())
}

/// `discard` leaves old data or zeros in its range and neighbours untouched.
pub async fn discard(lun: &dyn Lun) -> Result<(), LunError> {
    let a = lun.alignment() as usize;
    let base = lun.size() / 8 * 3;
    let want = pattern(30, 64 * a);
    lun.write_at(base, want.clone(), false).await?;
    lun.discard(base + a as u64, 32 * a as u64).await?;
    let got = lun.read_at(base, 64 * a).await?;
    assert!(got[..a] == want[..a], "discard clobbered the block before");
    for i in a..33 * a {
        assert!(
            got[i] == want[i] || got[i] == 0,
            "discarded byte {i} is neither old data nor zero"
        );
    }
    assert!(got[33 * a..] == want[33 * a..], "discard clobbered after");
    lun.discard(base, 0).await?;
    Ok(())
}

/// `flush` succeeds, with and without writes before it.
pub async fn flush(lun: &dyn Lun) -> Result<(), LunError> {
    lun.flush().await?;
    let a = lun.alignment() as usize;
    lun.write_at(0, pattern(40, a), false).await?;
    lun.flush().await?;
    lun.write_at(0, Bytes::new(), false).await?;
    assert_eq!(lun.read_at(0, a).await?, pattern(40, a));
    Ok(())
}

/// 16 tasks write disjoint ranges at once; every write lands.
pub async fn concurrent_disjoint_writes(lun: Arc<dyn Lun>) -> Result<(), LunError> {
    let a = lun.alignment() as usize;
    let len = 4 * a;
    let base = lun.size() / 2;
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let lun = lun.clone();
        tasks.push(tokio::spawn(async move {
            let off = base + i * len as u64;
            lun.write_at(off, pattern(50 + i as u8, len), i % 3 == 0)
                .await
        }));
    }
    for t in tasks {
        t.await.map_err(|e| LunError::PathUnreachable {
            reason: format!("writer task failed: {e}"),
        })??;
    }
    let got = lun.read_at(base, 16 * len).await?;
    for i in 0..16usize {
        assert!(
            got[i * len..(i + 1) * len] == pattern(50 + i as u8, len),
            "concurrent write {i} did not land intact"
        );
    }
    Ok(())
}
