//! [`ReservePool`]: this node's reserved allocation chunks (step 2 of the write path).
//!
//! New file blocks come from here, so a write that allocates needs no metadata round
//! trip per block. The pool refills with `Op::Reserve` in chunks. Its blocks belong to
//! one session: when the session changes (lost lease, restart), the service has already
//! returned them to the free pool, so the local copy is dropped.

use std::collections::BTreeMap;

use crate::meta::{BlockRange, SessionId};

/// Where new blocks should start: at a LUN block congruent to `phase` modulo `unit`.
/// The volume asks for the file block's own phase, so that the file's offsets and the
/// LUN's agree modulo the unit (see `VolumeConfig::placement_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub unit: u64,
    pub phase: u64,
}

/// How many of the pool's lowest ranges a placed allocation looks at before it settles
/// for the lowest fit.
const PLACEMENT_SCAN: usize = 64;

/// Free blocks reserved to this node's session (disjoint, coalesced ranges).
#[derive(Debug, Default)]
pub struct ReservePool {
    session: Option<SessionId>,
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl ReservePool {
    /// Blocks available for `session` (drops everything if the session changed).
    pub fn available(&mut self, session: SessionId) -> u64 {
        self.check_session(session);
        self.total
    }

    fn check_session(&mut self, session: SessionId) {
        if self.session != Some(session) {
            self.ranges.clear();
            self.total = 0;
            self.session = Some(session);
        }
    }

    /// Adds ranges the service reserved to `session`.
    pub fn add(&mut self, session: SessionId, ranges: &[BlockRange]) {
        self.check_session(session);
        for r in ranges {
            self.put(*r);
        }
    }

    /// Returns blocks taken earlier but not used (still reserved to `session`).
    pub fn give_back(&mut self, session: SessionId, ranges: &[BlockRange]) {
        if self.session == Some(session) {
            for r in ranges {
                self.put(*r);
            }
        }
    }

    fn put(&mut self, r: BlockRange) {
        if r.len == 0 {
            return;
        }
        let (mut start, mut len) = (r.start, r.len);
        if let Some((&ps, &pl)) = self.ranges.range(..start).next_back()
            && ps + pl == start
        {
            self.ranges.remove(&ps);
            start = ps;
            len += pl;
        }
        if let Some(nl) = self.ranges.remove(&(r.start + r.len)) {
            len += nl;
        }
        self.ranges.insert(start, len);
        self.total += r.len;
    }

    /// Takes exactly `n` blocks (as few ranges as possible, lowest first), or nothing
    /// if fewer are available. With a [`Placement`], one range of `n` blocks that starts
    /// where the placement asks comes first, if one of the lowest ranges has room for it.
    pub fn take(
        &mut self,
        session: SessionId,
        n: u64,
        place: Option<Placement>,
    ) -> Option<Vec<BlockRange>> {
        self.check_session(session);
        if n > self.total {
            return None;
        }
        if let Some(r) = place.and_then(|p| self.take_placed(session, n, p)) {
            return Some(r);
        }
        if let Some((&s, _)) = self.ranges.iter().find(|&(_, &l)| l >= n) {
            self.remove(s, n);
            return Some(vec![BlockRange { start: s, len: n }]);
        }
        let mut out = Vec::new();
        let mut left = n;
        while left > 0 {
            let (&s, &l) = self.ranges.iter().next()?;
            let take = l.min(left);
            out.push(BlockRange {
                start: s,
                len: take,
            });
            left -= take;
            self.remove(s, take);
        }
        Some(out)
    }

    /// Takes `n` blocks in one range that starts where `place` asks, or nothing.
    pub fn take_placed(
        &mut self,
        session: SessionId,
        n: u64,
        place: Placement,
    ) -> Option<Vec<BlockRange>> {
        self.check_session(session);
        let start = self.placed(place, n)?;
        self.cut(start, n);
        Some(vec![BlockRange { start, len: n }])
    }

    /// The lowest start `s ≡ phase (mod unit)` with `[s, s + n)` inside one range, among
    /// the first [`PLACEMENT_SCAN`] ranges (a pool cut into many small pieces is not
    /// searched end to end for every allocation).
    fn placed(&self, p: Placement, n: u64) -> Option<u64> {
        if p.unit <= 1 {
            return None;
        }
        self.ranges
            .iter()
            .take(PLACEMENT_SCAN)
            .find_map(|(&start, &len)| {
                let s = start + (p.phase % p.unit + p.unit - start % p.unit) % p.unit;
                (s + n <= start + len).then_some(s)
            })
    }

    /// Removes `[start, start + len)`, which lies inside one range, keeping both ends.
    fn cut(&mut self, start: u64, len: u64) {
        let Some((&rs, &rl)) = self.ranges.range(..=start).next_back() else {
            return;
        };
        debug_assert!(start + len <= rs + rl, "cut outside its range");
        self.ranges.remove(&rs);
        if start > rs {
            self.ranges.insert(rs, start - rs);
        }
        if rs + rl > start + len {
            self.ranges.insert(start + len, rs + rl - start - len);
        }
        self.total -= len;
    }

    fn remove(&mut self, start: u64, len: u64) {
        if let Some(l) = self.ranges.remove(&start) {
            if l > len {
                self.ranges.insert(start + len, l - len);
            }
            self.total -= len.min(l);
        }
    }

    /// Empties the pool, returning its ranges (to give back to the service).
    pub fn drain(&mut self) -> (Option<SessionId>, Vec<BlockRange>) {
        let out = self
            .ranges
            .iter()
            .map(|(&start, &len)| BlockRange { start, len })
            .collect();
        self.ranges.clear();
        self.total = 0;
        (self.session, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_prefers_one_range_and_session_change_drops_everything() {
        let mut p = ReservePool::default();
        p.add(
            1,
            &[
                BlockRange { start: 10, len: 4 },
                BlockRange {
                    start: 100,
                    len: 10,
                },
            ],
        );
        assert_eq!(
            p.take(1, 8, None),
            Some(vec![BlockRange { start: 100, len: 8 }])
        );
        assert_eq!(p.available(1), 6);
        assert_eq!(
            p.take(1, 6, None),
            Some(vec![
                BlockRange { start: 10, len: 4 },
                BlockRange { start: 108, len: 2 }
            ])
        );
        assert_eq!(p.take(1, 1, None), None);
        p.give_back(1, &[BlockRange { start: 10, len: 2 }]);
        p.give_back(1, &[BlockRange { start: 12, len: 2 }]);
        assert_eq!(
            p.take(1, 4, None),
            Some(vec![BlockRange { start: 10, len: 4 }])
        );
        p.add(1, &[BlockRange { start: 1, len: 1 }]);
        assert_eq!(p.available(2), 0);
    }

    #[test]
    fn a_placed_take_starts_at_its_phase_and_keeps_what_it_skipped() {
        let mut p = ReservePool::default();
        p.add(
            7,
            &[BlockRange {
                start: 1,
                len: 1000,
            }],
        );
        let at = |phase| Some(Placement { unit: 256, phase });
        let one = |start, len| Some(vec![BlockRange { start, len }]);
        // File block 0 of a 1 MiB write lands on LUN block 256, not 1.
        assert_eq!(p.take(7, 256, at(0)), one(256, 256));
        // The next MiB of the file follows on.
        assert_eq!(p.take(7, 256, at(256)), one(512, 256));
        assert_eq!(p.available(7), 1000 - 512);
        // The blocks skipped before 256 serve their own phases.
        assert_eq!(p.take(7, 3, at(5)), one(5, 3));
        // No room at the phase anywhere: the lowest fit, as without a placement.
        assert_eq!(
            p.take(7, 300, at(0)),
            Some(vec![
                BlockRange { start: 1, len: 4 },
                BlockRange { start: 8, len: 248 },
                BlockRange {
                    start: 768,
                    len: 48
                },
            ])
        );
        assert_eq!(p.available(7), 1000 - 512 - 3 - 300);
        // A unit of one block places nothing.
        let mut q = ReservePool::default();
        q.add(7, &[BlockRange { start: 3, len: 10 }]);
        assert_eq!(
            q.take(7, 2, Some(Placement { unit: 1, phase: 0 })),
            one(3, 2)
        );
    }
}
