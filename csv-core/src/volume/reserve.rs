//! [`ReservePool`]: this node's reserved allocation chunks (step 2 of the write path).
//!
//! New file blocks come from here, so a write that allocates needs no metadata round
//! trip per block. The pool refills with `Op::Reserve` in chunks. Its blocks belong to
//! one session: when the session changes (lost lease, restart), the service has already
//! returned them to the free pool, so the local copy is dropped.

use std::collections::BTreeMap;

use crate::meta::{BlockRange, SessionId};

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
    /// if fewer are available.
    pub fn take(&mut self, session: SessionId, n: u64) -> Option<Vec<BlockRange>> {
        self.check_session(session);
        if n > self.total {
            return None;
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
        assert_eq!(p.take(1, 8), Some(vec![BlockRange { start: 100, len: 8 }]));
        assert_eq!(p.available(1), 6);
        assert_eq!(
            p.take(1, 6),
            Some(vec![
                BlockRange { start: 10, len: 4 },
                BlockRange { start: 108, len: 2 }
            ])
        );
        assert_eq!(p.take(1, 1), None);
        p.give_back(1, &[BlockRange { start: 10, len: 2 }]);
        p.give_back(1, &[BlockRange { start: 12, len: 2 }]);
        assert_eq!(p.take(1, 4), Some(vec![BlockRange { start: 10, len: 4 }]));
        p.add(1, &[BlockRange { start: 1, len: 1 }]);
        assert_eq!(p.available(2), 0);
    }
}
