//! The allocation and namespace fsck: [`VolumeState::check_invariants`].
//!
//! It recomputes everything the state keeps incrementally (block ownership, block
//! counts, link counts, reachability, lock ownership) from scratch and reports every
//! disagreement as one line of text. It is a full scan, meant for tests and
//! `csvctl fsck`, never for the apply path.

use std::collections::{BTreeMap, BTreeSet};

use csv_core::meta::{FileKind, Ino, LockMode, ROOT_INO};

use super::VolumeState;

impl VolumeState {
    /// Checks every invariant of the module docs; returns all violations found.
    pub fn check_invariants(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        self.check_blocks(&mut errs);
        self.check_namespace(&mut errs);
        self.check_sessions_and_locks(&mut errs);
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    fn check_blocks(&self, errs: &mut Vec<String>) {
        let Some(vol) = &self.volume else {
            if !self.free.is_empty() || !self.inodes.is_empty() {
                errs.push("no volume, yet blocks or inodes exist".into());
            }
            return;
        };
        // (start, len, owner) of every claimed LUN range.
        let mut claims: Vec<(u64, u64, String)> = Vec::new();
        let mut prev_end: Option<u64> = None;
        let mut free_sum = 0u64;
        for r in self.free.iter() {
            if r.len == 0 {
                errs.push(format!("free pool has an empty range at {}", r.start));
            }
            if prev_end == Some(r.start) {
                errs.push(format!("free pool not coalesced at block {}", r.start));
            }
            prev_end = Some(r.end());
            free_sum += r.len;
            claims.push((r.start, r.len, "free pool".into()));
        }
        if free_sum != self.free.total() {
            errs.push(format!(
                "free pool counts {} blocks but holds {free_sum}",
                self.free.total()
            ));
        }
        for s in self.sessions.values() {
            for r in s.reserved.iter() {
                claims.push((r.start, r.len, format!("session {}", s.info.id)));
            }
            let sum: u64 = s.reserved.raw().values().sum();
            if sum != s.reserved.total() {
                errs.push(format!("session {} reservation total is wrong", s.info.id));
            }
        }
        for (&ino, i) in &self.inodes {
            let mut blocks = 0u64;
            let mut prev_file_end = 0u64;
            for (&key, e) in &i.extents {
                if key != e.file_block || e.len == 0 {
                    errs.push(format!("inode {ino}: malformed extent {e:?} at key {key}"));
                }
                if e.file_block < prev_file_end {
                    errs.push(format!(
                        "inode {ino}: extent at file block {} overlaps the previous one",
                        e.file_block
                    ));
                }
                prev_file_end = e.file_end();
                blocks += e.len;
                claims.push((e.lun_block, e.len, format!("inode {ino}")));
            }
            if i.attr.kind != FileKind::File && !i.extents.is_empty() {
                errs.push(format!("inode {ino}: a non-file with extents"));
            }
            if blocks != i.attr.blocks {
                errs.push(format!(
                    "inode {ino}: attr.blocks {} but extents hold {blocks}",
                    i.attr.blocks
                ));
            }
        }
        claims.sort();
        let mut pos = vol.data_start_block;
        for (start, len, owner) in &claims {
            let end = start.saturating_add(*len);
            if *start < vol.data_start_block || end > vol.total_blocks {
                errs.push(format!(
                    "{owner}: blocks {start}+{len} outside the data area"
                ));
            }
            if *start > pos {
                errs.push(format!(
                    "blocks {pos}..{start} are owned by nobody (leaked)"
                ));
            } else if *start < pos {
                errs.push(format!(
                    "{owner}: blocks {start}..{} are also owned by someone else",
                    end.min(pos)
                ));
            }
            pos = pos.max(end);
        }
        if pos < vol.total_blocks {
            errs.push(format!(
                "blocks {pos}..{} are owned by nobody (leaked)",
                vol.total_blocks
            ));
        }
    }

    fn check_namespace(&self, errs: &mut Vec<String>) {
        if self.volume.is_none() {
            return;
        }
        match self.inodes.get(&ROOT_INO) {
            Some(r) if r.attr.kind == FileKind::Dir && r.parent == ROOT_INO => {}
            _ => errs.push("root inode missing or not a directory".into()),
        }
        // Links seen per inode, and which directory holds each directory.
        let mut links: BTreeMap<Ino, u32> = BTreeMap::new();
        let mut held_by: BTreeMap<Ino, Vec<Ino>> = BTreeMap::new();
        for (&ino, i) in &self.inodes {
            if ino >= self.next_ino {
                errs.push(format!(
                    "inode {ino} is not below next_ino {}",
                    self.next_ino
                ));
            }
            if i.attr.ino != ino {
                errs.push(format!("inode {ino} says it is {}", i.attr.ino));
            }
            if i.attr.kind != FileKind::Dir && !i.entries.is_empty() {
                errs.push(format!("inode {ino}: a non-directory with entries"));
            }
            let mut subdirs = 0u32;
            for (name, &child) in &i.entries {
                if csv_core::meta::validate_name(name).is_err() {
                    errs.push(format!("dir {ino}: invalid entry name {name:?}"));
                }
                match self.inodes.get(&child) {
                    None => errs.push(format!(
                        "dir {ino}: entry {name:?} -> missing inode {child}"
                    )),
                    Some(c) => {
                        *links.entry(child).or_default() += 1;
                        if c.attr.kind == FileKind::Dir {
                            subdirs += 1;
                            held_by.entry(child).or_default().push(ino);
                        }
                    }
                }
            }
            if i.attr.kind == FileKind::Dir && i.attr.nlink != 2 + subdirs {
                errs.push(format!(
                    "dir {ino}: nlink {} but {subdirs} subdirectories",
                    i.attr.nlink
                ));
            }
        }
        for (&ino, i) in &self.inodes {
            let seen = links.get(&ino).copied().unwrap_or(0);
            if ino == ROOT_INO {
                if seen != 0 {
                    errs.push("the root is named by a directory entry".into());
                }
                continue;
            }
            if seen == 0 {
                errs.push(format!("inode {ino} is an orphan (no entry names it)"));
            }
            if i.attr.kind == FileKind::Dir {
                let holders = held_by.get(&ino).map_or(&[][..], |v| &v[..]);
                if holders != [i.parent] {
                    errs.push(format!(
                        "dir {ino}: parent {} but held by {holders:?}",
                        i.parent
                    ));
                }
            } else if i.attr.nlink != seen {
                errs.push(format!(
                    "inode {ino}: nlink {} but {seen} entries",
                    i.attr.nlink
                ));
            }
        }
        // Reachability from the root catches directory cycles.
        let mut reached = BTreeSet::from([ROOT_INO]);
        let mut stack = vec![ROOT_INO];
        while let Some(d) = stack.pop() {
            let Some(i) = self.inodes.get(&d) else {
                continue;
            };
            for &c in i.entries.values() {
                if reached.insert(c) {
                    stack.push(c);
                }
            }
        }
        for &ino in self.inodes.keys() {
            if !reached.contains(&ino) {
                errs.push(format!("inode {ino} is not reachable from the root"));
            }
        }
    }

    fn check_sessions_and_locks(&self, errs: &mut Vec<String>) {
        let mut by_node: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (&id, s) in &self.sessions {
            if s.info.id != id || id >= self.next_session {
                errs.push(format!("session {id}: bad id (next {})", self.next_session));
            }
            by_node.entry(s.info.node).or_default().push(id);
        }
        for (node, ids) in &by_node {
            if ids.len() > 1 {
                errs.push(format!("node {node} has several sessions {ids:?}"));
            }
        }
        for rec in self.nodes.values() {
            let live = by_node.get(&rec.id).and_then(|v| v.first().copied());
            if rec.session != live {
                errs.push(format!(
                    "node {} records session {:?} but has {live:?}",
                    rec.id, rec.session
                ));
            }
        }
        for (key, l) in &self.locks {
            if l.holders.is_empty() {
                errs.push(format!("lock {key} has no holder"));
            }
            if l.holders.len() > 1 && l.holders.iter().any(|h| h.mode == LockMode::Exclusive) {
                errs.push(format!("lock {key}: an exclusive holder is not alone"));
            }
            if l.holders.windows(2).any(|w| w[0].session >= w[1].session) {
                errs.push(format!("lock {key}: holders not sorted or repeated"));
            }
            for h in &l.holders {
                match self.sessions.get(&h.session) {
                    None => errs.push(format!("lock {key}: held by dead session {}", h.session)),
                    Some(s) if s.info.node != h.node => errs.push(format!(
                        "lock {key}: holder node {} but session {} is node {}",
                        h.node, h.session, s.info.node
                    )),
                    Some(_) => {}
                }
                if h.token > self.last_token || h.token == 0 {
                    errs.push(format!(
                        "lock {key}: token {} not in 1..={}",
                        h.token, self.last_token
                    ));
                }
            }
        }
    }
}
