//! [`MemLun`]: a sparse in-memory LUN with a volatile write cache, for tests.
//!
//! Storage is kept in 4 KiB pages in two `BTreeMap`s, so a 1 TiB LUN costs nothing
//! until it is written:
//! - `durable`: what survives a [`MemLun::crash`];
//! - `cache`: pages written since the last flush (the volatile write cache).
//!
//! Invariants:
//! - a read sees the cache first, then the durable layer, then zeros;
//! - `flush` moves every cached page to the durable layer; a `fua` write also applies
//!   its own bytes to the durable layer before it returns;
//! - `crash` drops the cache: every write acknowledged before a successful `flush`,
//!   and every `fua` write, survives; other writes may be lost (all of them are);
//! - `discard` and `write_zeroes` both make the range read as zeros (a page that
//!   becomes all zeros is stored as a zero marker, not as 4 KiB of zeros).

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use super::{Lun, LunError, LunFuture, check_aligned, check_range};

const PAGE: u64 = 4096;

type Page = Box<[u8]>;

/// A sparse in-memory LUN that models a volatile write cache (see the module docs).
pub struct MemLun {
    size: u64,
    alignment: u32,
    state: Mutex<MemState>,
}

#[derive(Default)]
struct MemState {
    durable: BTreeMap<u64, Page>,
    /// `None` marks a page zeroed (or discarded) since the last flush.
    cache: BTreeMap<u64, Option<Page>>,
}

impl MemState {
    /// The current content of page `idx`, `None` meaning all zeros.
    fn page(&self, idx: u64) -> Option<&[u8]> {
        match self.cache.get(&idx) {
            Some(entry) => entry.as_deref(),
            None => self.durable.get(&idx).map(|p| &p[..]),
        }
    }

    /// Applies `f` to a copy of page `idx` as currently visible and stores it in the cache.
    fn modify(&mut self, idx: u64, f: impl FnOnce(&mut [u8])) {
        let mut page: Page = match self.page(idx) {
            Some(p) => p.into(),
            None => vec![0u8; PAGE as usize].into_boxed_slice(),
        };
        f(&mut page);
        let zero = page.iter().all(|&b| b == 0);
        self.cache.insert(idx, if zero { None } else { Some(page) });
    }

    /// Applies `f` to the durable copy of page `idx` (a FUA write).
    fn modify_durable(&mut self, idx: u64, f: impl FnOnce(&mut [u8])) {
        let page = self
            .durable
            .entry(idx)
            .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
        f(page);
        if page.iter().all(|&b| b == 0) {
            self.durable.remove(&idx);
        }
    }
}

/// Calls `f(page_index, offset_in_page, range_in_buffer)` for each page piece of `offset..offset+len`.
fn for_each_piece(offset: u64, len: u64, mut f: impl FnMut(u64, usize, std::ops::Range<usize>)) {
    let mut done = 0u64;
    while done < len {
        let pos = offset + done;
        let in_page = pos % PAGE;
        let n = (PAGE - in_page).min(len - done);
        f(
            pos / PAGE,
            in_page as usize,
            done as usize..(done + n) as usize,
        );
        done += n;
    }
}

impl MemLun {
    /// A zero-filled LUN of `size` bytes with 512-byte alignment.
    pub fn new(size: u64) -> MemLun {
        MemLun::with_alignment(size, 512)
    }

    /// A zero-filled LUN whose requests must be multiples of `alignment` (a power of two).
    pub fn with_alignment(size: u64, alignment: u32) -> MemLun {
        MemLun {
            size,
            alignment: alignment.max(1),
            state: Mutex::new(MemState::default()),
        }
    }

    /// Simulates a power loss: drops every write that is not yet durable.
    pub fn crash(&self) {
        self.lock().cache.clear();
    }

    /// Number of pages in the volatile cache (written since the last flush).
    pub fn dirty_pages(&self) -> usize {
        self.lock().cache.len()
    }

    /// Number of non-zero pages in the durable layer (memory actually used).
    pub fn durable_pages(&self) -> usize {
        self.lock().durable.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters for a test disk, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), LunError> {
        check_range(offset, len, self.size)?;
        check_aligned(offset, len, self.alignment())
    }

    fn read_now(&self, offset: u64, len: usize) -> Result<Bytes, LunError> {
        self.check(offset, len as u64)?;
        let mut out = BytesMut::zeroed(len);
        let st = self.lock();
        for_each_piece(offset, len as u64, |idx, at, buf| {
            if let Some(page) = st.page(idx) {
                out[buf.clone()].copy_from_slice(&page[at..at + buf.len()]);
            }
        });
        Ok(out.freeze())
    }

    fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), LunError> {
        self.check(offset, data.len() as u64)?;
        let mut st = self.lock();
        for_each_piece(offset, data.len() as u64, |idx, at, buf| {
            let src = &data[buf];
            st.modify(idx, |p| p[at..at + src.len()].copy_from_slice(src));
            if fua {
                st.modify_durable(idx, |p| p[at..at + src.len()].copy_from_slice(src));
            }
        });
        Ok(())
    }

    fn zero_now(&self, offset: u64, len: u64) -> Result<(), LunError> {
        self.check(offset, len)?;
        let mut st = self.lock();
        for_each_piece(offset, len, |idx, at, buf| {
            if buf.len() as u64 == PAGE {
                st.cache.insert(idx, None);
            } else {
                st.modify(idx, |p| p[at..at + buf.len()].fill(0));
            }
        });
        Ok(())
    }
}

impl Lun for MemLun {
    fn size(&self) -> u64 {
        self.size
    }

    fn alignment(&self) -> u32 {
        self.alignment
    }

    fn describe(&self) -> String {
        format!("mem:{}", self.size)
    }

    fn read_at(&self, offset: u64, len: usize) -> LunFuture<'_, Bytes> {
        let res = self.read_now(offset, len);
        Box::pin(async move { res })
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> LunFuture<'_, ()> {
        let res = self.write_now(offset, &data, fua);
        Box::pin(async move { res })
    }

    fn flush(&self) -> LunFuture<'_, ()> {
        let mut st = self.lock();
        let cache = std::mem::take(&mut st.cache);
        for (idx, page) in cache {
            match page {
                Some(p) => {
                    st.durable.insert(idx, p);
                }
                None => {
                    st.durable.remove(&idx);
                }
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn discard(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        let res = self.zero_now(offset, len);
        Box::pin(async move { res })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> LunFuture<'_, ()> {
        let res = self.zero_now(offset, len);
        Box::pin(async move { res })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, b: u8) -> Bytes {
        Bytes::from(vec![b; len])
    }

    #[tokio::test]
    async fn huge_lun_costs_nothing_until_written() {
        let lun = MemLun::new(1 << 40);
        assert_eq!(
            lun.read_at((1 << 40) - 4096, 4096).await.unwrap()[..],
            [0; 4096]
        );
        lun.write_at(1 << 39, pattern(512, 7), false).await.unwrap();
        assert_eq!(lun.dirty_pages(), 1);
        lun.flush().await.unwrap();
        assert_eq!((lun.dirty_pages(), lun.durable_pages()), (0, 1));
    }

    #[tokio::test]
    async fn crash_drops_unflushed_writes_and_keeps_flushed_ones() {
        let lun = MemLun::new(1 << 20);
        lun.write_at(0, pattern(4096, 1), false).await.unwrap();
        lun.flush().await.unwrap();
        lun.write_at(0, pattern(512, 2), false).await.unwrap();
        lun.write_at(8192, pattern(512, 3), false).await.unwrap();
        assert_eq!(lun.read_at(0, 512).await.unwrap(), pattern(512, 2));
        lun.crash();
        assert_eq!(lun.read_at(0, 4096).await.unwrap(), pattern(4096, 1));
        assert_eq!(lun.read_at(8192, 512).await.unwrap(), pattern(512, 0));
    }

    #[tokio::test]
    async fn fua_write_survives_crash_but_neighbouring_cached_bytes_do_not() {
        let lun = MemLun::new(1 << 20);
        lun.write_at(0, pattern(512, 9), false).await.unwrap();
        lun.write_at(512, pattern(512, 5), true).await.unwrap();
        lun.crash();
        assert_eq!(lun.read_at(0, 512).await.unwrap(), pattern(512, 0));
        assert_eq!(lun.read_at(512, 512).await.unwrap(), pattern(512, 5));
    }

    #[tokio::test]
    async fn zeroed_range_is_volatile_until_flushed() {
        let lun = MemLun::new(1 << 20);
        lun.write_at(0, pattern(8192, 4), false).await.unwrap();
        lun.flush().await.unwrap();
        lun.write_zeroes(0, 8192).await.unwrap();
        assert_eq!(lun.read_at(0, 8192).await.unwrap(), pattern(8192, 0));
        lun.crash();
        assert_eq!(lun.read_at(0, 8192).await.unwrap(), pattern(8192, 4));
        lun.write_zeroes(0, 8192).await.unwrap();
        lun.flush().await.unwrap();
        assert_eq!(lun.durable_pages(), 0);
    }

    #[tokio::test]
    async fn unaligned_page_pieces_merge_with_existing_data() {
        let lun = MemLun::new(1 << 20);
        lun.write_at(3584, pattern(1024, 8), false).await.unwrap();
        let got = lun.read_at(3072, 2048).await.unwrap();
        assert_eq!(&got[..512], &[0; 512]);
        assert_eq!(&got[512..1536], &[8; 1024]);
        assert_eq!(&got[1536..], &[0; 512]);
    }
}
