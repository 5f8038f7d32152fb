//! The ghost-write ledger: keeps acknowledged data safe from writes whose outcome is unknown.
//!
//! A write sent on a path that then times out may still land on the LUN much later (a *ghost*),
//! after newer data for the same bytes went through another path, and roll those bytes back.
//! Closing the connection does not stop it (DESIGN.md, "Ghost writes"). This sans-IO ledger makes
//! sure a late ghost can never leave older data visible:
//!
//! - [`GhostLedger::write_unknown`] registers the ghost (byte range, path) and emits
//!   [`GhostCommand::Reissue`]: the same write must be sent through another path.
//! - While a ghost is unresolved, every write acknowledged through any path that overlaps it is
//!   recorded with its data ([`GhostLedger::write_acked`]); per byte only the newest data is kept.
//!   Reads take an [`Overlay`] of these records when they are issued and patch the LUN's answer
//!   with it, so the writing node never reads rolled-back data.
//! - When the ghost resolves (its path answers, [`GhostLedger::ghost_resolved`], or its target is
//!   confirmed dead, [`GhostLedger::path_dead`]) it may have landed, so the ledger emits
//!   [`GhostCommand::Rewrite`]s of the newest data of its range. Records are dropped only once the
//!   rewrites are acknowledged and nothing newer arrived meanwhile.
//! - Memory is bounded by a budget: [`GhostLedger::admit`] tells the caller to stall a new write
//!   whose recording would exceed it, until resolutions free memory
//!   ([`GhostCommand::RetryStalled`]).
//! - A rewrite and a client write of the same bytes never race: the target may run two
//!   concurrent writes in either order, so a rewrite's older data could land after the client's
//!   newer data. [`GhostLedger::admit`] holds a new write while a rewrite of its bytes is in
//!   flight, and a write already in flight when such a rewrite is emitted
//!   ([`GhostLedger::write_started`]) is recorded and rewritten once it is acknowledged
//!   ([`GhostLedger::flight_acked`]).
//!
//! The re-issue of a ghost is recorded like any other write, although a late landing of the ghost
//! writes the same bytes: a write concurrent with the re-issue may have landed after it, and without
//! the record a late ghost would flip the bytes after both writes were acknowledged.
//!
//! Rewrites are ordinary writes to the LUN and can themselves hang: the caller reports their
//! outcome with [`GhostLedger::rewrite_acked`], [`GhostLedger::rewrite_failed`] or
//! [`GhostLedger::rewrite_unknown`] (which turns the rewrite into a ghost of its own).
//!
//! Invariants (checked by `check_invariants` in tests):
//! - records never overlap, each holds exactly its bytes, `recorded_bytes` is their sum;
//! - every recorded byte lies inside an unresolved ghost or a rewrite in flight ("cover");
//! - for every covered byte that was written after its cover appeared, the record holds the data
//!   of the last acknowledged write to it;
//! - a rewrite in flight carries the records' data at the time it was issued (`issued_seq`); when
//!   it is acknowledged, any byte recorded since is rewritten again, so concurrent rewrites and
//!   newer writes converge on the newest data.
//!
//! Budget: recorded bytes stay within the budget plus the bytes of writes admitted but not yet
//! acknowledged when a ghost appeared, plus re-issued writes (a re-issue is never stalled: it
//! completes a write that is already in progress).

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

/// Ledger-assigned id of an unresolved write.
pub type GhostId = u64;
/// Ledger-assigned id of a rewrite in flight.
pub type RewriteId = u64;
/// Ledger-assigned id of a client write in flight ([`GhostLedger::write_started`]).
pub type FlightId = u64;
/// The caller's id for a path to the LUN (its own SAN path, or a peer carrying its I/O).
pub type PathId = u64;

/// Largest rewrite the ledger emits in one command (contiguous records are merged up to this).
pub const MAX_REWRITE: usize = 1 << 20;

/// What the I/O loop must do for the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GhostCommand {
    /// Send this write (the one that became `ghost`) through another path, without asking
    /// [`GhostLedger::admit`] (it continues a write already admitted). Report its acknowledgement
    /// with `write_acked`, or if it times out again `write_unknown`. The original request
    /// completes when it is acknowledged.
    Reissue {
        ghost: GhostId,
        offset: u64,
        data: Bytes,
    },
    /// Write this newest data through a healthy path and report the outcome for `id`.
    Rewrite {
        id: RewriteId,
        offset: u64,
        data: Bytes,
    },
    /// Memory was freed: retry admission of writes that were told to stall.
    RetryStalled,
}

/// The verdict of [`GhostLedger::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send the write.
    Go,
    /// Hold the write until [`GhostCommand::RetryStalled`], then ask again.
    Stall,
}

/// Newest data for some LUN bytes, captured when a read was issued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlay {
    /// `(LUN offset, data)`, sorted, non-overlapping.
    pieces: Vec<(u64, Bytes)>,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// True when the overlay holds every byte of `offset..offset+len` (the LUN need not be read).
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        let mut at = offset;
        let end = offset.saturating_add(len);
        for (o, d) in &self.pieces {
            if *o > at {
                break;
            }
            at = at.max(o + d.len() as u64);
        }
        at >= end
    }

    /// Patches `buf`, the LUN's answer for bytes starting at `offset`, with the newest data.
    pub fn apply(&self, offset: u64, buf: &mut [u8]) {
        let end = offset.saturating_add(buf.len() as u64);
        for (o, d) in &self.pieces {
            let (s, e) = ((*o).max(offset), (o + d.len() as u64).min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d[(s - o) as usize..(e - o) as usize]);
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Ghost {
    start: u64,
    end: u64,
    path: PathId,
}

#[derive(Debug, Clone)]
struct Rewrite {
    start: u64,
    end: u64,
    /// The write sequence number when it was issued: records newer than this are not in it.
    issued_seq: u64,
}

/// A client write between admission and its outcome.
#[derive(Debug, Clone)]
struct Flight {
    start: u64,
    end: u64,
    /// A rewrite of an overlapping range was emitted while this write was in flight: the two
    /// may execute in either order, so the rewrite's older data may land after this write.
    raced: bool,
}

/// Newest data of `[start, end)` (start is the map key); `data.len() == end - start`.
#[derive(Debug, Clone)]
struct Record {
    end: u64,
    seq: u64,
    data: Bytes,
}

/// The ghost-write ledger of one node. See the module docs.
#[derive(Debug, Clone)]
pub struct GhostLedger {
    budget: usize,
    seq: u64,
    next_id: u64,
    ghosts: BTreeMap<GhostId, Ghost>,
    rewrites: BTreeMap<RewriteId, Rewrite>,
    records: BTreeMap<u64, Record>,
    recorded_bytes: usize,
    /// Client writes in flight (only those the caller registered).
    flights: BTreeMap<FlightId, Flight>,
    /// An admission was refused since memory was last freed.
    stalled: bool,
}

impl GhostLedger {
    /// A ledger that records at most about `budget_bytes` of newest data (see the module docs).
    pub fn new(budget_bytes: usize) -> Self {
        GhostLedger {
            budget: budget_bytes,
            seq: 0,
            next_id: 1,
            ghosts: BTreeMap::new(),
            rewrites: BTreeMap::new(),
            records: BTreeMap::new(),
            recorded_bytes: 0,
            flights: BTreeMap::new(),
            stalled: false,
        }
    }

    /// Bytes of newest data held.
    pub fn recorded_bytes(&self) -> usize {
        self.recorded_bytes
    }

    pub fn unresolved_ghosts(&self) -> usize {
        self.ghosts.len()
    }

    pub fn rewrites_in_flight(&self) -> usize {
        self.rewrites.len()
    }

    /// Nothing unresolved, nothing in flight, nothing recorded.
    pub fn is_idle(&self) -> bool {
        self.ghosts.is_empty() && self.rewrites.is_empty() && self.records.is_empty()
    }

    /// Whether a new client write of `offset..offset+len` may be sent now. Writes that overlap no
    /// ghost or rewrite always go; others go while recording them fits the budget.
    pub fn admit(&mut self, offset: u64, len: u64) -> Admission {
        let end = offset.saturating_add(len);
        // A write sent while a rewrite of the same bytes is in flight could be overtaken by
        // the rewrite's older data; it waits for the rewrite's outcome instead (one write's
        // time; see `write_started` for writes already in flight when a rewrite is emitted).
        if self.rewrite_overlaps(offset, end) {
            self.stalled = true;
            return Admission::Stall;
        }
        let covered: u64 = clip(&self.covers(), offset, end)
            .iter()
            .map(|(s, e)| e - s)
            .sum();
        if covered == 0 {
            return Admission::Go;
        }
        let already: u64 = self.pieces(offset, end).map(|(s, e, _)| e - s).sum();
        let grow = usize::try_from(covered - already).unwrap_or(usize::MAX);
        if self.recorded_bytes.saturating_add(grow) <= self.budget {
            Admission::Go
        } else {
            self.stalled = true;
            Admission::Stall
        }
    }

    /// An admitted client write of `offset..offset+len` is being sent. Report its end with
    /// [`GhostLedger::flight_acked`] or [`GhostLedger::flight_abandoned`]. A rewrite emitted
    /// while it is in flight may execute after it, so such a write's data is rewritten once it
    /// is acknowledged.
    pub fn write_started(&mut self, offset: u64, len: u64) -> FlightId {
        let id = self.alloc_id();
        let end = offset.saturating_add(len);
        let raced = self.rewrite_overlaps(offset, end);
        self.flights.insert(
            id,
            Flight {
                start: offset,
                end,
                raced,
            },
        );
        id
    }

    /// The write of `flight` was acknowledged with `data` at `offset` (as
    /// [`GhostLedger::write_acked`]). If a rewrite of its bytes was emitted while it was in
    /// flight, its data is recorded and rewritten: the rewrite may have landed after it.
    pub fn flight_acked(
        &mut self,
        flight: FlightId,
        offset: u64,
        data: &[u8],
    ) -> Vec<GhostCommand> {
        let mut out = Vec::new();
        let raced = self.flights.remove(&flight).is_some_and(|f| f.raced);
        if !raced {
            self.write_acked(offset, data);
            return out;
        }
        let end = offset.saturating_add(data.len() as u64);
        self.seq += 1;
        self.record(offset, Bytes::copy_from_slice(data), self.seq);
        // The rewrite carries this data (or newer) and covers the record while in flight.
        self.emit_rewrites(offset, end, 0, &mut out);
        self.prune(&mut out);
        out
    }

    /// The write of `flight` ended without an acknowledgement (refused, failed, or its caller
    /// gave up); nothing is recorded.
    pub fn flight_abandoned(&mut self, flight: FlightId) {
        self.flights.remove(&flight);
    }

    /// A write of `data` at `offset` was acknowledged (through any path, including re-issues).
    /// Call it before completing the request, so reads issued afterwards see it.
    pub fn write_acked(&mut self, offset: u64, data: &[u8]) {
        let end = offset.saturating_add(data.len() as u64);
        self.seq += 1;
        let seq = self.seq;
        for (s, e) in clip(&self.covers(), offset, end) {
            let bytes = Bytes::copy_from_slice(&data[(s - offset) as usize..(e - offset) as usize]);
            self.record(s, bytes, seq);
        }
    }

    /// Makes `data` the newest data of `start..start+len`, replacing what was recorded there.
    fn record(&mut self, start: u64, data: Bytes, seq: u64) {
        let end = start + data.len() as u64;
        self.remove_range(start, end);
        self.recorded_bytes += data.len();
        self.records.insert(start, Record { end, seq, data });
    }

    /// Whether a rewrite in flight overlaps `[start, end)`.
    fn rewrite_overlaps(&self, start: u64, end: u64) -> bool {
        self.rewrites
            .values()
            .any(|r| r.start < end && start < r.end)
    }

    /// A write of `data` at `offset` sent on `path` timed out: its outcome is unknown. Returns the
    /// ghost's id (report its resolution with it) and a [`GhostCommand::Reissue`] of the write.
    pub fn write_unknown(
        &mut self,
        offset: u64,
        data: Bytes,
        path: PathId,
    ) -> (GhostId, Vec<GhostCommand>) {
        let id = self.alloc_id();
        let end = offset.saturating_add(data.len() as u64);
        self.ghosts.insert(
            id,
            Ghost {
                start: offset,
                end,
                path,
            },
        );
        (
            id,
            vec![GhostCommand::Reissue {
                ghost: id,
                offset,
                data,
            }],
        )
    }

    /// The path answered for `ghost` (success or error): it is no longer in flight, and may have
    /// landed. Emits rewrites of the newest data of its range. Unknown ids are ignored.
    pub fn ghost_resolved(&mut self, ghost: GhostId) -> Vec<GhostCommand> {
        let mut out = Vec::new();
        if let Some(g) = self.ghosts.remove(&ghost) {
            self.emit_rewrites(g.start, g.end, 0, &mut out);
        }
        self.prune(&mut out);
        out
    }

    /// The target behind `path` is confirmed dead (process gone, or it confirmed aborting its
    /// requests): every ghost on it is resolved. They may have landed before, so their ranges are
    /// rewritten all the same.
    pub fn path_dead(&mut self, path: PathId) -> Vec<GhostCommand> {
        let dead: Vec<GhostId> = self
            .ghosts
            .iter()
            .filter(|(_, g)| g.path == path)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in dead {
            if let Some(g) = self.ghosts.remove(&id) {
                self.emit_rewrites(g.start, g.end, 0, &mut out);
            }
        }
        self.prune(&mut out);
        out
    }

    /// Rewrite `id` was acknowledged. Bytes recorded after it was issued are rewritten again (the
    /// rewrite may have landed after them); the rest can be dropped once no cover remains.
    pub fn rewrite_acked(&mut self, id: RewriteId) -> Vec<GhostCommand> {
        let mut out = Vec::new();
        if let Some(r) = self.rewrites.remove(&id) {
            self.emit_rewrites(r.start, r.end, r.issued_seq + 1, &mut out);
        }
        self.prune(&mut out);
        out
    }

    /// Rewrite `id` failed with an answer (it is not in flight): it is re-emitted with the
    /// current newest data. Send it through another path.
    pub fn rewrite_failed(&mut self, id: RewriteId) -> Vec<GhostCommand> {
        let mut out = Vec::new();
        if let Some(r) = self.rewrites.remove(&id) {
            self.emit_rewrites(r.start, r.end, 0, &mut out);
        }
        self.prune(&mut out);
        out
    }

    /// Rewrite `id` sent on `path` timed out: it becomes a ghost (returned) and is re-emitted with
    /// the current newest data.
    pub fn rewrite_unknown(
        &mut self,
        id: RewriteId,
        path: PathId,
    ) -> (Option<GhostId>, Vec<GhostCommand>) {
        let mut out = Vec::new();
        let Some(r) = self.rewrites.remove(&id) else {
            return (None, out);
        };
        let gid = self.alloc_id();
        self.ghosts.insert(
            gid,
            Ghost {
                start: r.start,
                end: r.end,
                path,
            },
        );
        self.emit_rewrites(r.start, r.end, 0, &mut out);
        self.prune(&mut out);
        (Some(gid), out)
    }

    /// The newest data the ledger holds for `offset..offset+len`. Take it when the read is
    /// issued and apply it to the LUN's answer when it completes.
    pub fn overlay(&self, offset: u64, len: u64) -> Overlay {
        let end = offset.saturating_add(len);
        Overlay {
            pieces: self
                .pieces(offset, end)
                .map(|(s, e, r)| (s, slice_of(s, e, r)))
                .collect(),
        }
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Merged, sorted ranges of unresolved ghosts and rewrites in flight.
    fn covers(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .ghosts
            .values()
            .map(|g| (g.start, g.end))
            .chain(self.rewrites.values().map(|r| (r.start, r.end)))
            .filter(|(s, e)| s < e)
            .collect();
        v.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }

    /// Records overlapping `[start, end)`, clipped to it, in order.
    fn pieces(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, (u64, &Record))> {
        // The record that starts before `start` may reach into the range.
        let first = self
            .records
            .range(..=start)
            .next_back()
            .map_or(start, |(k, _)| *k);
        self.records
            .range(first..end)
            .filter(move |(_, r)| r.end > start)
            .map(move |(k, r)| ((*k).max(start), r.end.min(end), (*k, r)))
    }

    /// Cuts `[start, end)` out of the records.
    fn remove_range(&mut self, start: u64, end: u64) {
        let hit: Vec<u64> = self.pieces(start, end).map(|(_, _, (k, _))| k).collect();
        for k in hit {
            let Some(r) = self.records.remove(&k) else {
                continue;
            };
            self.recorded_bytes -= (r.end - k) as usize;
            // Keep the parts outside the range, copied so the dropped middle is freed.
            for (s, e) in [(k, start.min(r.end)), (end.max(k), r.end)] {
                if s < e {
                    let data = Bytes::copy_from_slice(&r.data[(s - k) as usize..(e - k) as usize]);
                    self.records.insert(
                        s,
                        Record {
                            end: e,
                            seq: r.seq,
                            data,
                        },
                    );
                    self.recorded_bytes += (e - s) as usize;
                }
            }
        }
    }

    /// Emits rewrites of the records in `[start, end)` with `seq >= min_seq`, merging contiguous
    /// records up to [`MAX_REWRITE`], and registers them as in flight.
    fn emit_rewrites(&mut self, start: u64, end: u64, min_seq: u64, out: &mut Vec<GhostCommand>) {
        let mut runs: Vec<(u64, u64, Vec<Bytes>)> = Vec::new();
        for (s, e, (k, r)) in self.pieces(start, end) {
            if r.seq < min_seq {
                continue;
            }
            let piece = slice_of(s, e, (k, r));
            match runs.last_mut() {
                Some(run)
                    if run.1 == s && (run.1 - run.0) as usize + piece.len() <= MAX_REWRITE =>
                {
                    run.1 = e;
                    run.2.push(piece);
                }
                _ => runs.push((s, e, vec![piece])),
            }
        }
        for (s, e, parts) in runs {
            let data = if parts.len() == 1 {
                parts.into_iter().next().unwrap_or_default()
            } else {
                let mut buf = BytesMut::with_capacity((e - s) as usize);
                for p in &parts {
                    buf.extend_from_slice(p);
                }
                buf.freeze()
            };
            let id = self.alloc_id();
            self.rewrites.insert(
                id,
                Rewrite {
                    start: s,
                    end: e,
                    issued_seq: self.seq,
                },
            );
            for f in self.flights.values_mut() {
                if f.start < e && s < f.end {
                    f.raced = true;
                }
            }
            out.push(GhostCommand::Rewrite {
                id,
                offset: s,
                data,
            });
        }
    }

    /// Drops recorded bytes no cover protects any more; tells stalled writers when memory freed.
    fn prune(&mut self, out: &mut Vec<GhostCommand>) {
        if !self.records.is_empty() {
            let mut at = 0;
            for (s, e) in self.covers() {
                if at < s {
                    self.remove_range(at, s);
                }
                at = e;
            }
            if at < u64::MAX {
                self.remove_range(at, u64::MAX);
            }
        }
        // Covers shrank or records went: a stalled write may fit now (it asks again).
        if self.stalled {
            self.stalled = false;
            out.push(GhostCommand::RetryStalled);
        }
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let mut sum = 0;
        let mut prev_end = 0;
        let covers = self.covers();
        for (k, r) in &self.records {
            assert!(*k >= prev_end, "records overlap at {k}");
            assert!(r.end > *k);
            assert_eq!(r.data.len() as u64, r.end - k);
            assert_eq!(
                clip(&covers, *k, r.end)
                    .iter()
                    .map(|(s, e)| e - s)
                    .sum::<u64>(),
                r.end - k,
                "record {k}..{} outside every cover",
                r.end
            );
            sum += (r.end - k) as usize;
            prev_end = r.end;
        }
        assert_eq!(sum, self.recorded_bytes);
    }
}

fn slice_of(s: u64, e: u64, (k, r): (u64, &Record)) -> Bytes {
    r.data.slice((s - k) as usize..(e - k) as usize)
}

/// The parts of sorted, merged `ranges` inside `[start, end)`.
fn clip(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .map(|&(s, e)| (s.max(start), e.min(end)))
        .filter(|(s, e)| s < e)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    fn rewrites(cmds: &[GhostCommand]) -> Vec<(RewriteId, u64, Bytes)> {
        cmds.iter()
            .filter_map(|c| match c {
                GhostCommand::Rewrite { id, offset, data } => Some((*id, *offset, data.clone())),
                _ => None,
            })
            .collect()
    }

    fn read(l: &GhostLedger, lun: &[u8], offset: u64, len: u64) -> Vec<u8> {
        let mut buf = lun[offset as usize..(offset + len) as usize].to_vec();
        l.overlay(offset, len).apply(offset, &mut buf);
        buf
    }

    #[test]
    fn writes_are_not_recorded_without_ghosts() {
        let mut l = GhostLedger::new(1024);
        assert_eq!(l.admit(0, 100), Admission::Go);
        l.write_acked(0, b"hello");
        assert!(l.is_idle());
        assert!(l.overlay(0, 5).is_empty());
    }

    #[test]
    fn unknown_write_is_reissued_with_its_data() {
        let mut l = GhostLedger::new(1024);
        let (g, cmds) = l.write_unknown(8, b(b"abcd"), 1);
        assert_eq!(
            cmds,
            [GhostCommand::Reissue {
                ghost: g,
                offset: 8,
                data: b(b"abcd")
            }]
        );
        assert_eq!(l.unresolved_ghosts(), 1);
        // The re-issue is recorded (the ghost covers it); no rewrite until the ghost resolves.
        l.write_acked(8, b"abcd");
        assert_eq!(l.recorded_bytes(), 4);
        l.check_invariants();
    }

    #[test]
    fn only_the_overlap_is_recorded_and_reads_see_the_newest_data() {
        let mut l = GhostLedger::new(1024);
        let (g, _) = l.write_unknown(4, b(b"GGGG"), 1); // bytes 4..8
        l.write_acked(2, b"nnnnnn"); // 2..8, overlap 4..8
        assert_eq!(l.recorded_bytes(), 4);
        l.write_acked(6, b"zz"); // newer data for 6..8
        assert_eq!(l.recorded_bytes(), 4);
        l.check_invariants();
        // The ghost lands late and rolls 4..8 back on the LUN; the overlay hides it.
        let mut lun = b"..nnnnzz..".to_vec();
        lun[4..8].copy_from_slice(b"GGGG");
        assert_eq!(read(&l, &lun, 0, 10), b"..nnnnzz..");
        assert!(l.overlay(4, 4).covers(4, 4));
        assert!(!l.overlay(3, 4).covers(3, 4));
        // Resolution rewrites the newest data of the ghost's range (merged into one write).
        let cmds = l.ghost_resolved(g);
        let rw = rewrites(&cmds);
        assert_eq!(rw.len(), 1);
        assert_eq!((rw[0].1, &rw[0].2[..]), (4, &b"nnzz"[..]));
        assert_eq!(
            l.recorded_bytes(),
            4,
            "kept until the rewrite is acknowledged"
        );
        assert!(l.rewrite_acked(rw[0].0).is_empty());
        assert!(l.is_idle());
    }

    #[test]
    fn a_write_acknowledged_during_a_rewrite_is_rewritten_again() {
        let mut l = GhostLedger::new(1024);
        let (g, _) = l.write_unknown(0, b(b"GGGG"), 1);
        l.write_acked(0, b"AAAA");
        let rw = rewrites(&l.ghost_resolved(g));
        assert_eq!(rw.len(), 1);
        // While the rewrite of AAAA is in flight, BB is acknowledged for 1..3; the rewrite may
        // land after it.
        l.write_acked(1, b"BB");
        assert_eq!(read(&l, b"AAAA", 0, 4), b"ABBA");
        let again = rewrites(&l.rewrite_acked(rw[0].0));
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].1, &again[0].2[..]), (1, &b"BB"[..]));
        assert_eq!(l.recorded_bytes(), 2);
        l.rewrite_acked(again[0].0);
        assert!(l.is_idle());
    }

    /// Found by `redirect_faults::san_hang_*` (about 1 run in 20 on loaded cores): a client
    /// write in flight when its ghost resolves is acknowledged after the rewrite of the older
    /// data; the two ran concurrently at the target, the rewrite landed last, and with the
    /// records already dropped nothing put the newer data back.
    #[test]
    fn a_write_in_flight_when_a_rewrite_is_emitted_is_rewritten_after_its_ack() {
        let mut l = GhostLedger::new(1024);
        let (g, _) = l.write_unknown(0, b(b"GGGG"), 1);
        l.write_acked(0, b"AAAA"); // the re-issue
        assert_eq!(l.admit(0, 4), Admission::Go);
        let w = l.write_started(0, 4); // BBBB sent
        let rw = rewrites(&l.ghost_resolved(g));
        assert_eq!((rw[0].1, &rw[0].2[..]), (0, &b"AAAA"[..]));
        // The target runs BBBB, then the rewrite of AAAA; the rewrite is answered first.
        let mut lun = *b"AAAA";
        assert!(rewrites(&l.rewrite_acked(rw[0].0)).is_empty());
        let again = rewrites(&l.flight_acked(w, 0, b"BBBB"));
        assert_eq!(
            again.len(),
            1,
            "BBBB is rewritten: the rewrite may have landed after it"
        );
        assert_eq!((again[0].1, &again[0].2[..]), (0, &b"BBBB"[..]));
        assert_eq!(read(&l, &lun, 0, 4), b"BBBB", "reads see BBBB meanwhile");
        l.check_invariants();
        lun.copy_from_slice(&again[0].2);
        l.rewrite_acked(again[0].0);
        assert!(l.is_idle());
        assert_eq!(read(&l, &lun, 0, 4), b"BBBB");
    }

    #[test]
    fn writes_wait_while_a_rewrite_of_their_bytes_is_in_flight_and_others_go() {
        let mut l = GhostLedger::new(1024);
        let (g, _) = l.write_unknown(0, b(b"GGGG"), 1);
        l.write_acked(0, b"AAAA");
        let rw = rewrites(&l.ghost_resolved(g));
        assert_eq!(l.admit(2, 4), Admission::Stall);
        assert_eq!(l.admit(4, 4), Admission::Go, "no overlap");
        let cmds = l.rewrite_acked(rw[0].0);
        assert!(cmds.contains(&GhostCommand::RetryStalled));
        assert_eq!(l.admit(2, 4), Admission::Go);
        // A write that started with no rewrite in flight and ends without one records nothing.
        let w = l.write_started(2, 4);
        assert!(l.flight_acked(w, 2, b"CCCC").is_empty());
        assert!(l.is_idle());
        // An abandoned flight leaves nothing behind.
        let w = l.write_started(0, 4);
        l.flight_abandoned(w);
        assert!(l.is_idle());
    }

    #[test]
    fn a_hung_rewrite_becomes_a_ghost_and_is_reissued_with_current_data() {
        let mut l = GhostLedger::new(1024);
        let (g, _) = l.write_unknown(0, b(b"GG"), 1);
        l.write_acked(0, b"AA");
        let rw = rewrites(&l.ghost_resolved(g));
        l.write_acked(0, b"CC");
        let (g2, cmds) = l.rewrite_unknown(rw[0].0, 2);
        let g2 = g2.unwrap();
        let rw2 = rewrites(&cmds);
        assert_eq!((rw2[0].1, &rw2[0].2[..]), (0, &b"CC"[..]));
        assert_eq!(l.unresolved_ghosts(), 1);
        assert!(l.rewrite_acked(rw2[0].0).is_empty());
        assert_eq!(
            l.recorded_bytes(),
            2,
            "the hung rewrite still covers the bytes"
        );
        let rw3 = rewrites(&l.ghost_resolved(g2));
        assert_eq!(&rw3[0].2[..], b"CC");
        l.rewrite_acked(rw3[0].0);
        assert!(l.is_idle());
        assert_eq!(l.rewrite_unknown(999, 1), (None, vec![]));
    }

    #[test]
    fn overlapping_ghosts_keep_records_until_the_last_one_resolves_in_any_order() {
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]] {
            let mut l = GhostLedger::new(1024);
            let ids = [
                l.write_unknown(0, b(b"aaaaaaaa"), 1).0, // 0..8
                l.write_unknown(4, b(b"bbbbbbbb"), 2).0, // 4..12
                l.write_unknown(10, b(b"cc"), 1).0,      // 10..12
            ];
            l.write_acked(0, b"NNNNNNNNNNNNNNNN"); // 0..16: 0..12 covered
            assert_eq!(l.recorded_bytes(), 12);
            // Every ghost landed late: the LUN holds garbage until the rewrites land.
            let mut lun = [b'x'; 16];
            for (n, &i) in order.iter().enumerate() {
                for (id, o, d) in rewrites(&l.ghost_resolved(ids[i])) {
                    lun[o as usize..o as usize + d.len()].copy_from_slice(&d);
                    l.rewrite_acked(id);
                }
                l.check_invariants();
                assert_eq!(
                    read(&l, &lun, 0, 12)[..],
                    b"NNNNNNNNNNNN"[..],
                    "order {order:?} step {n}"
                );
                if n < 2 {
                    assert!(l.recorded_bytes() > 0);
                }
            }
            assert!(l.is_idle(), "order {order:?}");
        }
    }

    #[test]
    fn a_dead_path_resolves_only_its_own_ghosts() {
        let mut l = GhostLedger::new(1024);
        let (_, _) = l.write_unknown(0, b(b"aa"), 1);
        let (_, _) = l.write_unknown(4, b(b"bb"), 1);
        let (g3, _) = l.write_unknown(8, b(b"cc"), 2);
        l.write_acked(0, b"0123456789");
        let rw = rewrites(&l.path_dead(1));
        let ranges: Vec<_> = rw.iter().map(|(_, o, d)| (*o, d.len())).collect();
        assert_eq!(ranges, [(0, 2), (4, 2)]);
        assert_eq!(l.unresolved_ghosts(), 1);
        for (id, _, _) in rw {
            l.rewrite_acked(id);
        }
        assert_eq!(l.recorded_bytes(), 2);
        for (id, _, _) in rewrites(&l.ghost_resolved(g3)) {
            l.rewrite_acked(id);
        }
        assert!(l.is_idle());
        assert!(l.ghost_resolved(g3).is_empty(), "unknown ids are ignored");
    }

    #[test]
    fn a_failed_rewrite_is_reemitted() {
        let mut l = GhostLedger::new(1024);
        let (g, _) = l.write_unknown(0, b(b"GG"), 1);
        l.write_acked(0, b"AA");
        let rw = rewrites(&l.ghost_resolved(g));
        let again = rewrites(&l.rewrite_failed(rw[0].0));
        assert_eq!((again[0].1, &again[0].2[..]), (0, &b"AA"[..]));
        assert_ne!(again[0].0, rw[0].0);
        l.rewrite_acked(again[0].0);
        assert!(l.is_idle());
    }

    #[test]
    fn writes_stall_only_when_recording_them_exceeds_the_budget() {
        let mut l = GhostLedger::new(8);
        let (g, _) = l.write_unknown(0, b(&[1; 16]), 1);
        assert_eq!(l.admit(100, 64), Admission::Go, "no overlap: never stalls");
        assert_eq!(l.admit(0, 8), Admission::Go);
        l.write_acked(0, &[2; 8]);
        assert_eq!(
            l.admit(0, 8),
            Admission::Go,
            "overwriting recorded bytes needs no memory"
        );
        assert_eq!(l.admit(8, 1), Admission::Stall);
        assert_eq!(l.admit(4, 8), Admission::Stall, "4 of its bytes are new");
        let cmds = l.ghost_resolved(g);
        assert!(cmds.contains(&GhostCommand::RetryStalled));
        let rw = rewrites(&cmds);
        // The rewrite of 0..8 is in flight: writes to those bytes wait for it; 8..16 is
        // covered by nothing any more.
        assert_eq!(l.admit(4, 8), Admission::Stall);
        assert_eq!(l.admit(8, 8), Admission::Go);
        l.rewrite_acked(rw[0].0);
        assert!(l.is_idle());
        assert_eq!(l.admit(4, 8), Admission::Go);
    }

    #[test]
    fn contiguous_records_are_merged_into_rewrites_of_bounded_size() {
        let mut l = GhostLedger::new(usize::MAX);
        let size = 3 * MAX_REWRITE as u64;
        let (g, _) = l.write_unknown(0, Bytes::from(vec![0u8; size as usize]), 1);
        // Many small writes, then one hole at 10..12.
        for i in 0..size / 4096 {
            l.write_acked(i * 4096, &[i as u8; 4096]);
        }
        l.remove_range(10, 12);
        let rw = rewrites(&l.ghost_resolved(g));
        let shape: Vec<_> = rw.iter().map(|(_, o, d)| (*o, d.len())).collect();
        // Runs break between records: 12..4096 plus 255 whole records, then 256 records each.
        let m = MAX_REWRITE;
        assert_eq!(
            shape,
            [(0, 10), (12, m - 12), (m as u64, m), (2 * m as u64, m)]
        );
        assert_eq!(&rw[1].2[4083..4085], &[0, 1], "LUN bytes 4095..4097");
    }

    #[test]
    fn overlay_apply_clips_to_the_buffer() {
        let o = Overlay {
            pieces: vec![(2, b(b"xy")), (6, b(b"zzz"))],
        };
        let mut buf = [b'.'; 5];
        o.apply(3, &mut buf);
        assert_eq!(&buf, b"y..zz");
        assert!(o.covers(6, 3) && !o.covers(5, 2) && o.covers(2, 0));
    }

    // ---- model: a LUN as Vec<u8>, ghosts landing at random later times ----

    const LUN: usize = 48;
    const PATHS: u64 = 3;

    #[derive(Debug, Clone)]
    enum Op {
        /// A client write; its first `hangs` attempts time out (on paths `path`, `path+1`, ...).
        Write {
            off: usize,
            len: usize,
            hangs: usize,
            path: u64,
        },
        Read {
            off: usize,
            len: usize,
        },
        /// A write in flight executes on the LUN; its path has not answered yet.
        Land {
            pick: usize,
        },
        /// The path answers for a write in flight (`ok`: it executed, if it had not yet).
        Answer {
            pick: usize,
            ok: bool,
        },
        /// A rewrite in flight times out.
        RewriteTimeout {
            pick: usize,
        },
        /// A path's target dies; requests in flight on it may have executed first (`mask`).
        PathDead {
            path: u64,
            mask: u32,
        },
    }

    #[derive(Debug)]
    enum Kind {
        Ghost(GhostId),
        Rewrite(RewriteId),
    }

    #[derive(Debug)]
    struct Flight {
        kind: Kind,
        path: PathId,
        offset: u64,
        data: Bytes,
        landed: bool,
    }

    struct Sim {
        lun: Vec<u8>,
        /// Content of the last acknowledged writes.
        expected: Vec<u8>,
        ledger: GhostLedger,
        flights: Vec<Flight>,
        writes: u8,
        next_path: u64,
        retry_seen: bool,
    }

    impl Sim {
        fn land(lun: &mut [u8], f: &mut Flight) {
            lun[f.offset as usize..f.offset as usize + f.data.len()].copy_from_slice(&f.data);
            f.landed = true;
        }

        fn run(&mut self, cmds: Vec<GhostCommand>) {
            for c in cmds {
                match c {
                    GhostCommand::Rewrite { id, offset, data } => {
                        self.next_path = (self.next_path + 1) % PATHS;
                        self.flights.push(Flight {
                            kind: Kind::Rewrite(id),
                            path: self.next_path,
                            offset,
                            data,
                            landed: false,
                        });
                    }
                    GhostCommand::RetryStalled => self.retry_seen = true,
                    GhostCommand::Reissue { .. } => panic!("re-issue outside write_unknown"),
                }
            }
        }

        fn answer(&mut self, idx: usize, ok: bool) {
            let mut f = self.flights.remove(idx);
            if ok && !f.landed {
                Self::land(&mut self.lun, &mut f);
            }
            let cmds = match f.kind {
                Kind::Ghost(g) => self.ledger.ghost_resolved(g),
                Kind::Rewrite(r) if ok => self.ledger.rewrite_acked(r),
                Kind::Rewrite(r) => self.ledger.rewrite_failed(r),
            };
            self.run(cmds);
        }

        fn write(&mut self, off: usize, len: usize, hangs: usize, mut path: u64) {
            let len = len.min(LUN - off);
            self.writes += 1;
            let data = Bytes::from(vec![self.writes; len]);
            while self.ledger.admit(off as u64, len as u64) == Admission::Stall {
                // Stalled: wait for the oldest write in flight to answer.
                assert!(!self.flights.is_empty(), "stalled with nothing in flight");
                self.retry_seen = false;
                self.answer(0, true);
                assert!(self.retry_seen, "memory freed without RetryStalled");
            }
            for _ in 0..hangs {
                let (g, cmds) = self.ledger.write_unknown(off as u64, data.clone(), path);
                assert_eq!(
                    cmds,
                    [GhostCommand::Reissue {
                        ghost: g,
                        offset: off as u64,
                        data: data.clone()
                    }]
                );
                self.flights.push(Flight {
                    kind: Kind::Ghost(g),
                    path,
                    offset: off as u64,
                    data: data.clone(),
                    landed: false,
                });
                path = (path + 1) % PATHS;
            }
            self.lun[off..off + len].copy_from_slice(&data);
            self.ledger.write_acked(off as u64, &data);
            self.expected[off..off + len].copy_from_slice(&data);
        }

        fn step(&mut self, op: &Op) {
            let n = self.flights.len();
            match *op {
                Op::Write {
                    off,
                    len,
                    hangs,
                    path,
                } => self.write(off, len, hangs, path),
                Op::Read { off, len } => {
                    let len = len.min(LUN - off);
                    let o = self.ledger.overlay(off as u64, len as u64);
                    let mut buf = self.lun[off..off + len].to_vec();
                    o.apply(off as u64, &mut buf);
                    assert_eq!(buf, self.expected[off..off + len], "read {off}+{len}");
                    if o.covers(off as u64, len as u64) {
                        let mut blind = vec![0xEE; len];
                        o.apply(off as u64, &mut blind);
                        assert_eq!(blind, buf);
                    }
                }
                Op::Land { pick } if n > 0 => {
                    Self::land(&mut self.lun, &mut self.flights[pick % n]);
                }
                Op::Answer { pick, ok } if n > 0 => self.answer(pick % n, ok),
                Op::RewriteTimeout { pick } => {
                    let rws: Vec<usize> = (0..n)
                        .filter(|&i| matches!(self.flights[i].kind, Kind::Rewrite(_)))
                        .collect();
                    if let Some(&i) = rws.get(pick % rws.len().max(1)) {
                        let Kind::Rewrite(r) = self.flights[i].kind else {
                            unreachable!()
                        };
                        let (g, cmds) = self.ledger.rewrite_unknown(r, self.flights[i].path);
                        self.flights[i].kind = Kind::Ghost(g.expect("rewrite was in flight"));
                        self.run(cmds);
                    }
                }
                Op::PathDead { path, mask } => {
                    let mut dead = Vec::new();
                    let mut i = 0;
                    while i < self.flights.len() {
                        if self.flights[i].path == path {
                            let mut f = self.flights.remove(i);
                            if !f.landed && mask & (1 << (dead.len() % 32)) != 0 {
                                Self::land(&mut self.lun, &mut f);
                            }
                            dead.push(f);
                        } else {
                            i += 1;
                        }
                    }
                    let cmds = self.ledger.path_dead(path);
                    self.run(cmds);
                    for f in dead {
                        if let Kind::Rewrite(r) = f.kind {
                            let cmds = self.ledger.rewrite_failed(r);
                            self.run(cmds);
                        }
                    }
                }
                Op::Land { .. } | Op::Answer { .. } => {}
            }
        }

        /// After every step: a full read via the ledger returns the last acknowledged data, and
        /// every byte no write in flight can still touch already holds it on the LUN (what other
        /// nodes read).
        fn check(&self) {
            self.ledger.check_invariants();
            let mut all = self.lun.clone();
            self.ledger.overlay(0, LUN as u64).apply(0, &mut all);
            assert_eq!(all, self.expected, "node read rolled-back data");
            for i in 0..LUN {
                let touched = self
                    .flights
                    .iter()
                    .any(|f| (f.offset as usize..f.offset as usize + f.data.len()).contains(&i));
                if !touched {
                    assert_eq!(
                        self.lun[i], self.expected[i],
                        "byte {i} rolled back on the LUN"
                    );
                }
            }
        }
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..LUN, 1usize..16, prop_oneof![3 => Just(0usize), 2 => Just(1), 1 => Just(2)], 0..PATHS)
                .prop_map(|(off, len, hangs, path)| Op::Write { off, len, hangs, path }),
            2 => (0..LUN, 1usize..LUN).prop_map(|(off, len)| Op::Read { off, len }),
            3 => any::<usize>().prop_map(|pick| Op::Land { pick }),
            3 => (any::<usize>(), prop::bool::weighted(0.8)).prop_map(|(pick, ok)| Op::Answer { pick, ok }),
            1 => any::<usize>().prop_map(|pick| Op::RewriteTimeout { pick }),
            1 => (0..PATHS, any::<u32>()).prop_map(|(path, mask)| Op::PathDead { path, mask }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(600))]
        #[test]
        fn following_the_ledger_never_loses_or_rolls_back_acknowledged_writes(
            budget in prop_oneof![Just(0usize), 1usize..32, Just(usize::MAX)],
            ops in proptest::collection::vec(arb_op(), 1..120),
        ) {
            let mut sim = Sim {
                lun: vec![0; LUN],
                expected: vec![0; LUN],
                ledger: GhostLedger::new(budget),
                flights: Vec::new(),
                writes: 0,
                next_path: 0,
                retry_seen: false,
            };
            for op in &ops {
                sim.step(op);
                sim.check();
            }
            // Every path eventually answers (some after landing late).
            while !sim.flights.is_empty() {
                let last = sim.flights.len() - 1;
                sim.answer(last, true);
                sim.check();
            }
            prop_assert!(sim.ledger.is_idle(), "ledger holds state after everything resolved");
            prop_assert_eq!(sim.ledger.recorded_bytes(), 0);
            prop_assert_eq!(&sim.lun, &sim.expected);
        }
    }
}
