//! Data mapping: committing written extents and `fallocate`.
//!
//! A commit may only map LUN blocks that are reserved to the committing session or
//! that the file already maps at the same file block (the unwritten -> written
//! conversion, or a rewrite of the same blocks). Everything else is refused before
//! anything changes, so a stale or confused writer can never map another file's
//! blocks or free space it was not given. Mappings a commit replaces return to the
//! pool and are reported for discard.

use csv_core::meta::{
    BlockRange, Extent, ExtentState, FallocMode, FencingToken, FileKind, Ino, LockMode,
    MAX_FILE_SIZE, MetaError, SessionId, Timestamp, data_lock_key,
};

use super::alloc::{self, coalesce};
use super::{Inode, OpResult, VolumeState};
use crate::types::Response;

fn file_only(i: &Inode) -> Result<(), MetaError> {
    match i.attr.kind {
        FileKind::File => Ok(()),
        FileKind::Dir => Err(MetaError::IsDir),
        _ => Err(MetaError::Invalid("not a regular file".into())),
    }
}

impl VolumeState {
    /// Checks `session` holds `data_lock_key(ino)` exclusively with exactly `token`.
    fn check_fence(
        &self,
        session: SessionId,
        ino: Ino,
        token: FencingToken,
    ) -> Result<(), MetaError> {
        let lock = self.locks.get(&data_lock_key(ino));
        let holds = lock.is_some_and(|l| {
            l.holders
                .iter()
                .any(|h| h.session == session && h.mode == LockMode::Exclusive && h.token == token)
        });
        if holds {
            return Ok(());
        }
        let current = lock
            .and_then(|l| l.holders.iter().map(|h| h.token).max())
            .unwrap_or(0);
        Err(MetaError::Fenced {
            given: token,
            current,
        })
    }

    pub(super) fn commit_write(
        &mut self,
        session: SessionId,
        ino: Ino,
        token: Option<FencingToken>,
        extents: &[Extent],
        size: Option<u64>,
        mtime: Timestamp,
    ) -> OpResult {
        let vol = self.vol()?;
        let (bs, data_start, total) = (
            u64::from(vol.block_size),
            vol.data_start_block,
            vol.total_blocks,
        );
        let reserved = &self.live_session(session)?.reserved;
        let inode = self.inode(ino)?;
        file_only(inode)?;
        if let Some(t) = token {
            self.check_fence(session, ino, t)?;
        }
        if size.is_some_and(|s| s > MAX_FILE_SIZE) {
            return Err(MetaError::FileTooBig);
        }
        let max_blocks = MAX_FILE_SIZE / bs;
        for e in extents {
            if e.len == 0 || e.state != ExtentState::Written {
                return Err(MetaError::Invalid(
                    "commit extents must be written and non-empty".into(),
                ));
            }
            match e.file_block.checked_add(e.len) {
                Some(end) if end <= max_blocks => {}
                _ => return Err(MetaError::FileTooBig),
            }
            if e.lun_block < data_start
                || e.lun_block.checked_add(e.len).is_none_or(|end| end > total)
            {
                return Err(MetaError::Invalid(format!(
                    "LUN blocks {}+{} outside the data area",
                    e.lun_block, e.len
                )));
            }
        }
        let mut by_file: Vec<&Extent> = extents.iter().collect();
        by_file.sort_by_key(|e| e.file_block);
        let mut by_lun: Vec<&Extent> = extents.iter().collect();
        by_lun.sort_by_key(|e| e.lun_block);
        if by_file
            .windows(2)
            .any(|w| w[0].file_end() > w[1].file_block)
            || by_lun.windows(2).any(|w| w[0].lun_end() > w[1].lun_block)
        {
            return Err(MetaError::Invalid("commit extents overlap".into()));
        }
        // Every LUN block must be reserved to the session or already mapped here.
        let mut from_reservation = Vec::new();
        for e in extents {
            let mut p = e.lun_block;
            while p < e.lun_end() {
                if let Some(r) = reserved.covering(p) {
                    let end = r.end().min(e.lun_end());
                    from_reservation.push(BlockRange {
                        start: p,
                        len: end - p,
                    });
                    p = end;
                    continue;
                }
                let fb = e.file_block + (p - e.lun_block);
                match alloc::extent_at(&inode.extents, fb) {
                    Some(cur) if cur.lun_block + (fb - cur.file_block) == p => {
                        p = (p + (cur.file_end() - fb)).min(e.lun_end());
                    }
                    _ => {
                        return Err(MetaError::Invalid(format!(
                            "LUN block {p} is neither reserved to session {session} nor mapped at file block {fb}"
                        )));
                    }
                }
            }
        }

        if let Some(s) = self.sessions.get_mut(&session) {
            for r in &from_reservation {
                s.reserved.remove(r.start, r.len);
            }
        }
        let now = self.now_ts();
        let i = self.node_mut(ino);
        let mut freed = Vec::new();
        for e in extents {
            for piece in alloc::cut(&mut i.extents, e.file_block, e.file_end()) {
                i.attr.blocks -= piece.len;
                let same = piece.lun_block == e.lun_block + (piece.file_block - e.file_block);
                if !same {
                    freed.push(BlockRange {
                        start: piece.lun_block,
                        len: piece.len,
                    });
                }
            }
            alloc::insert_merged(&mut i.extents, *e);
            i.attr.blocks += e.len;
        }
        if let Some(s) = size {
            i.attr.size = i.attr.size.max(s);
        }
        i.attr.mtime = mtime;
        i.attr.ctime = now;
        let attr = i.attr.clone();
        for r in &freed {
            self.free.insert(r.start, r.len);
        }
        Ok(Response::AttrFreed(attr, coalesce(freed)))
    }

    pub(super) fn fallocate(
        &mut self,
        ino: Ino,
        offset: u64,
        len: u64,
        mode: FallocMode,
    ) -> OpResult {
        let bs = u64::from(self.vol()?.block_size);
        let inode = self.inode(ino)?;
        file_only(inode)?;
        if len == 0 {
            return Err(MetaError::Invalid("fallocate of 0 bytes".into()));
        }
        let end = match offset.checked_add(len) {
            Some(end) if end <= MAX_FILE_SIZE => end,
            _ => return Err(MetaError::FileTooBig),
        };
        // Whole blocks inside the range, and blocks touching it.
        let (inner_first, inner_end) = (offset.div_ceil(bs), end / bs);
        let (outer_first, outer_end) = (offset / bs, end.div_ceil(bs));
        let (keep_size, allocate) = match mode {
            FallocMode::Allocate { keep_size } | FallocMode::ZeroRange { keep_size } => {
                (keep_size, true)
            }
            FallocMode::PunchHole => (true, false),
        };
        let holes = if allocate {
            alloc::holes(&inode.extents, outer_first, outer_end)
        } else {
            Vec::new()
        };
        let need: u64 = holes.iter().map(|h| h.1).sum();
        if need > self.free.total() {
            return Err(MetaError::NoSpace);
        }

        let mut new = Vec::new();
        for (start, hlen) in holes {
            let mut fb = start;
            for r in self.free.take(hlen) {
                new.push(Extent {
                    file_block: fb,
                    lun_block: r.start,
                    len: r.len,
                    state: ExtentState::Unwritten,
                });
                fb += r.len;
            }
        }
        let now = self.now_ts();
        let i = self.node_mut(ino);
        let mut freed = Vec::new();
        for e in new {
            alloc::insert_merged(&mut i.extents, e);
        }
        i.attr.blocks += need;
        match mode {
            FallocMode::Allocate { .. } => {}
            FallocMode::PunchHole => {
                freed = alloc::cut(&mut i.extents, inner_first, inner_end);
                i.attr.blocks -= freed.iter().map(|e| e.len).sum::<u64>();
                i.attr.mtime = now;
            }
            FallocMode::ZeroRange { .. } => {
                if inner_first < inner_end {
                    alloc::set_state(
                        &mut i.extents,
                        inner_first,
                        inner_end,
                        ExtentState::Unwritten,
                    );
                }
                i.attr.mtime = now;
            }
        }
        if !keep_size && end > i.attr.size {
            i.attr.size = end;
            i.attr.mtime = now;
        }
        i.attr.ctime = now;
        let attr = i.attr.clone();
        for e in &freed {
            self.free.insert(e.lun_block, e.len);
        }
        Ok(Response::AttrFreed(attr, alloc::lun_ranges(&freed)))
    }
}
