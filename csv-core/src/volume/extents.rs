//! [`ExtentMap`]: a file's extent map as the volume layer caches it (committed extents
//! overlaid with this node's not-yet-committed ones).
//!
//! Invariants: extents never overlap in file space and have `len > 0`; neighbours that
//! are contiguous in file and LUN space and share a state are merged.

use std::collections::BTreeMap;

use crate::meta::{Extent, ExtentState};

/// What a run of file blocks maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Not mapped: reads as zeros, writing needs new space.
    Hole,
    /// Mapped at `lun_block` (for the run's first block).
    Mapped { lun_block: u64, state: ExtentState },
}

/// A run of file blocks `[file_block, file_block + len)` of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub file_block: u64,
    pub len: u64,
    pub kind: RunKind,
}

/// Non-overlapping extents keyed by their first file block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    map: BTreeMap<u64, Extent>,
}

impl ExtentMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// A map of `extents` (which must not overlap).
    pub fn from_extents(extents: impl IntoIterator<Item = Extent>) -> Self {
        let mut m = ExtentMap::new();
        for e in extents {
            m.insert(e);
        }
        m
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every extent, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Extent> {
        self.map.values()
    }

    /// Extents overlapping `[first, end)`, whole, in file order.
    pub fn overlapping(&self, first: u64, end: u64) -> Vec<Extent> {
        crate::meta::extents_overlapping(&self.map, first, end)
            .copied()
            .collect()
    }

    /// Removes the mapping of `[first, end)`, splitting extents at the edges; returns the
    /// removed pieces in file order.
    pub fn cut(&mut self, first: u64, end: u64) -> Vec<Extent> {
        crate::meta::cut_extents(&mut self.map, first, end)
    }

    /// Maps `e`, replacing whatever mapped its file range, and merges neighbours.
    pub fn insert(&mut self, e: Extent) {
        if e.len == 0 {
            return;
        }
        self.cut(e.file_block, e.file_end());
        let mut e = e;
        let mergeable = |a: &Extent, b: &Extent| {
            a.file_end() == b.file_block && a.lun_end() == b.lun_block && a.state == b.state
        };
        if let Some((_, prev)) = self.map.range(..e.file_block).next_back()
            && mergeable(prev, &e)
        {
            let prev = *prev;
            self.map.remove(&prev.file_block);
            e = Extent {
                len: prev.len + e.len,
                ..prev
            };
        }
        if let Some(next) = self.map.get(&e.file_end()).copied()
            && mergeable(&e, &next)
        {
            self.map.remove(&next.file_block);
            e.len += next.len;
        }
        self.map.insert(e.file_block, e);
    }

    /// Runs covering exactly `[first, end)`, in order, clipped to the range.
    pub fn runs(&self, first: u64, end: u64) -> Vec<Run> {
        let mut out = Vec::new();
        let mut pos = first;
        for e in self.overlapping(first, end) {
            if e.file_block > pos {
                out.push(Run {
                    file_block: pos,
                    len: e.file_block - pos,
                    kind: RunKind::Hole,
                });
                pos = e.file_block;
            }
            let hi = e.file_end().min(end);
            if hi > pos {
                out.push(Run {
                    file_block: pos,
                    len: hi - pos,
                    kind: RunKind::Mapped {
                        lun_block: e.lun_block + (pos - e.file_block),
                        state: e.state,
                    },
                });
                pos = hi;
            }
        }
        if pos < end {
            out.push(Run {
                file_block: pos,
                len: end - pos,
                kind: RunKind::Hole,
            });
        }
        out
    }

    /// The extent holding file block `fb`.
    pub fn at(&self, fb: u64) -> Option<Extent> {
        let (_, e) = self.map.range(..=fb).next_back()?;
        (fb < e.file_end()).then_some(*e)
    }

    /// The first `Written` block at or after `fb`.
    pub fn next_data(&self, fb: u64) -> Option<u64> {
        self.overlapping(fb, u64::MAX)
            .into_iter()
            .find(|e| e.state == ExtentState::Written)
            .map(|e| e.file_block.max(fb))
    }

    /// The first block at or after `fb` that is not `Written`.
    pub fn next_hole(&self, fb: u64) -> u64 {
        let mut pos = fb;
        while let Some(e) = self.at(pos) {
            if e.state != ExtentState::Written {
                return pos;
            }
            pos = e.file_end();
        }
        pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(fb: u64, lb: u64, len: u64) -> Extent {
        Extent {
            file_block: fb,
            lun_block: lb,
            len,
            state: ExtentState::Written,
        }
    }

    #[test]
    fn insert_merges_contiguous_and_splits_overlapped() {
        let mut m = ExtentMap::new();
        m.insert(w(0, 100, 2));
        m.insert(w(2, 102, 2));
        assert_eq!(m.iter().copied().collect::<Vec<_>>(), vec![w(0, 100, 4)]);
        m.insert(w(1, 500, 1));
        assert_eq!(
            m.iter().copied().collect::<Vec<_>>(),
            vec![w(0, 100, 1), w(1, 500, 1), w(2, 102, 2)]
        );
    }

    #[test]
    fn runs_cover_the_range_exactly_with_holes() {
        let m = ExtentMap::from_extents([w(2, 10, 2), w(6, 20, 4)]);
        let r = m.runs(1, 8);
        let lens: Vec<_> = r.iter().map(|r| (r.file_block, r.len)).collect();
        assert_eq!(lens, vec![(1, 1), (2, 2), (4, 2), (6, 2)]);
        assert_eq!(r[0].kind, RunKind::Hole);
        assert_eq!(
            r[3].kind,
            RunKind::Mapped {
                lun_block: 20,
                state: ExtentState::Written
            }
        );
        assert_eq!(m.next_data(0), Some(2));
        assert_eq!(m.next_data(7), Some(7));
        assert_eq!(m.next_data(10), None);
        assert_eq!(m.next_hole(2), 4);
        assert_eq!(m.next_hole(0), 0);
    }
}
