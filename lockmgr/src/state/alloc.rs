//! Block bookkeeping: [`RangeSet`] (the free pool and each session's reservations) and
//! the per-file extent map helpers.
//!
//! A `RangeSet` is a map `start -> len` of disjoint, non-empty, coalesced LUN ranges
//! (two entries never touch) plus a running total. Because it is coalesced, any
//! contiguous run of blocks it contains lies inside a single entry.
//!
//! An extent map is a `BTreeMap<file_block, Extent>` keyed by each extent's
//! `file_block`; extents never overlap in file space and have `len > 0`. Adjacent
//! extents that are contiguous in file and LUN space and share a state are merged.

use std::collections::BTreeMap;

use csv_core::meta::{BlockRange, Extent, ExtentState};
use serde::{Deserialize, Serialize};

/// Disjoint, coalesced LUN block ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RangeSet {
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl RangeSet {
    /// Blocks in the set.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges in ascending order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = BlockRange> + '_ {
        self.ranges
            .iter()
            .map(|(&start, &len)| BlockRange { start, len })
    }

    /// The number of entries (for the fsck and tests).
    pub(crate) fn raw(&self) -> &BTreeMap<u64, u64> {
        &self.ranges
    }

    /// The entry containing `block`, if any.
    pub(crate) fn covering(&self, block: u64) -> Option<BlockRange> {
        let (&start, &len) = self.ranges.range(..=block).next_back()?;
        (block < start + len).then_some(BlockRange { start, len })
    }

    /// Whether every block of `[start, start + len)` is in the set.
    pub(crate) fn contains(&self, start: u64, len: u64) -> bool {
        match self.covering(start) {
            Some(r) => start.checked_add(len).is_some_and(|end| end <= r.end()),
            None => false,
        }
    }

    /// Whether any block of `[start, start + len)` is in the set.
    pub(crate) fn intersects(&self, start: u64, len: u64) -> bool {
        let end = start.saturating_add(len);
        self.covering(start).is_some() || self.ranges.range(start..end).next().is_some()
    }

    /// Adds `[start, start + len)`, which must be disjoint from the set; merges neighbours.
    pub(crate) fn insert(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        debug_assert!(
            !self.intersects(start, len),
            "double insert of {start}+{len}"
        );
        let mut new_start = start;
        let mut new_len = len;
        if let Some((&ps, &pl)) = self.ranges.range(..start).next_back()
            && ps + pl == start
        {
            self.ranges.remove(&ps);
            new_start = ps;
            new_len += pl;
        }
        if let Some(nl) = self.ranges.remove(&(start + len)) {
            new_len += nl;
        }
        self.ranges.insert(new_start, new_len);
        self.total += len;
    }

    /// Removes `[start, start + len)`, which must be contained in the set.
    /// Returns false (and changes nothing) if it is not.
    pub(crate) fn remove(&mut self, start: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(r) = self.covering(start) else {
            return false;
        };
        let end = start + len;
        if end > r.end() {
            return false;
        }
        self.ranges.remove(&r.start);
        if r.start < start {
            self.ranges.insert(r.start, start - r.start);
        }
        if end < r.end() {
            self.ranges.insert(end, r.end() - end);
        }
        self.total -= len;
        true
    }

    /// Takes up to `n` blocks: the lowest range that holds all of them (first fit), else
    /// the largest ranges first (fewest ranges), each taken from its low end.
    /// Returns the ranges taken, sorted by start; empty only if the set is empty or `n == 0`.
    pub(crate) fn take(&mut self, n: u64) -> Vec<BlockRange> {
        let want = n.min(self.total);
        if want == 0 {
            return Vec::new();
        }
        let first_fit = self
            .ranges
            .iter()
            .find(|&(_, &len)| len >= want)
            .map(|(&s, _)| s);
        let mut taken = Vec::new();
        if let Some(start) = first_fit {
            taken.push(BlockRange { start, len: want });
        } else {
            let mut by_size: Vec<BlockRange> = self.iter().collect();
            by_size.sort_by(|a, b| b.len.cmp(&a.len).then(a.start.cmp(&b.start)));
            let mut left = want;
            for r in by_size {
                if left == 0 {
                    break;
                }
                let len = r.len.min(left);
                taken.push(BlockRange {
                    start: r.start,
                    len,
                });
                left -= len;
            }
            taken.sort();
        }
        for r in &taken {
            let removed = self.remove(r.start, r.len);
            debug_assert!(removed);
        }
        taken
    }
}

/// Sorts ranges and merges touching ones.
pub(crate) fn coalesce(mut v: Vec<BlockRange>) -> Vec<BlockRange> {
    v.retain(|r| r.len > 0);
    v.sort();
    let mut out: Vec<BlockRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if last.end() >= r.start => {
                let end = last.end().max(r.end());
                last.len = end - last.start;
            }
            _ => out.push(r),
        }
    }
    out
}

/// A file's extent map: `file_block -> Extent`.
pub(crate) type ExtentMap = csv_core::meta::ExtentTree;

/// The extent containing file block `fb`, if any.
pub(crate) fn extent_at(map: &ExtentMap, fb: u64) -> Option<&Extent> {
    let (_, e) = map.range(..=fb).next_back()?;
    (fb < e.file_end()).then_some(e)
}

/// Extents overlapping file blocks `[first, end)`, in file order.
pub(crate) fn overlapping(map: &ExtentMap, first: u64, end: u64) -> impl Iterator<Item = &Extent> {
    csv_core::meta::extents_overlapping(map, first, end)
}

/// Removes the mapping of file blocks `[first, end)`, splitting extents at the edges.
/// Returns the removed pieces (in file order).
pub(crate) fn cut(map: &mut ExtentMap, first: u64, end: u64) -> Vec<Extent> {
    csv_core::meta::cut_extents(map, first, end)
}

fn mergeable(a: &Extent, b: &Extent) -> bool {
    a.file_end() == b.file_block && a.lun_end() == b.lun_block && a.state == b.state
}

/// Inserts `e` into a hole of the map (its file range must be unmapped) and merges it
/// with compatible neighbours.
pub(crate) fn insert_merged(map: &mut ExtentMap, e: Extent) {
    debug_assert!(
        overlapping(map, e.file_block, e.file_end())
            .next()
            .is_none()
    );
    let mut e = e;
    if let Some((_, prev)) = map.range(..e.file_block).next_back()
        && mergeable(prev, &e)
    {
        let prev = *prev;
        map.remove(&prev.file_block);
        e = Extent {
            len: prev.len + e.len,
            ..prev
        };
    }
    if let Some(next) = map.get(&e.file_end()).copied()
        && mergeable(&e, &next)
    {
        map.remove(&next.file_block);
        e.len += next.len;
    }
    map.insert(e.file_block, e);
}

/// The unmapped runs of file blocks `[first, end)` as `(start, len)`.
pub(crate) fn holes(map: &ExtentMap, first: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = first;
    for e in overlapping(map, first, end) {
        if e.file_block > pos {
            out.push((pos, e.file_block - pos));
        }
        pos = pos.max(e.file_end());
    }
    if pos < end {
        out.push((pos, end - pos));
    }
    out
}

/// Sets the state of every mapped block in `[first, end)` to `state`.
pub(crate) fn set_state(map: &mut ExtentMap, first: u64, end: u64, state: ExtentState) {
    if !overlapping(map, first, end).any(|e| e.state != state) {
        return;
    }
    for piece in cut(map, first, end) {
        insert_merged(map, Extent { state, ..piece });
    }
}

/// The LUN ranges of extents.
pub(crate) fn lun_ranges(extents: &[Extent]) -> Vec<BlockRange> {
    coalesce(
        extents
            .iter()
            .map(|e| BlockRange {
                start: e.lun_block,
                len: e.len,
            })
            .collect(),
    )
}
