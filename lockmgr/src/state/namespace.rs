//! Namespace operations: create, link, unlink, rmdir, rename, setattr and xattrs.
//!
//! POSIX rules as ext4 applies them: a directory's `nlink` is `2 + subdirectories`;
//! directories cannot be hard-linked; rename never moves a directory into its own
//! subtree; create/unlink/rename stamp the parents' `mtime` and `ctime` with the
//! command's time. When the last link of a file goes, its extents return to the pool
//! and are reported in `Freed` so the caller can discard them on the LUN.

use std::collections::BTreeMap;

use csv_core::meta::{
    Attr, FileKind, Ino, MAX_FILE_SIZE, MAX_NAME_LEN, MAX_SYMLINK_LEN, MAX_XATTR_VALUE, MetaError,
    RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO, Timestamp, validate_name,
};

use super::alloc::{self, ExtentMap};
use super::{Inode, MAX_LINKS, OpResult, VolumeState};
use crate::types::Response;

/// `XATTR_CREATE` and `XATTR_REPLACE` of setxattr(2).
const XATTR_CREATE: u32 = 1;
const XATTR_REPLACE: u32 = 2;

/// Mode and ownership of a new inode.
pub(super) struct Owner {
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

/// The fields of a `SetAttr`.
pub(super) struct AttrChange {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
}

impl VolumeState {
    /// The inode `ino`, which the caller has checked exists.
    pub(super) fn node_mut(&mut self, ino: Ino) -> &mut Inode {
        match self.inodes.get_mut(&ino) {
            Some(i) => i,
            None => unreachable!("inode {ino} checked before mutation"),
        }
    }

    fn touch_dir(&mut self, dir: Ino) {
        let now = self.now_ts();
        let d = self.node_mut(dir);
        d.attr.mtime = now;
        d.attr.ctime = now;
    }

    /// Whether `ino` is `ancestor` or lies below it (walking directory parents).
    fn is_within(&self, mut ino: Ino, ancestor: Ino) -> bool {
        for _ in 0..=self.inodes.len() {
            if ino == ancestor {
                return true;
            }
            if ino == ROOT_INO {
                return false;
            }
            match self.inodes.get(&ino) {
                Some(i) => ino = i.parent,
                None => return false,
            }
        }
        false
    }

    /// Removes an inode whose last link is gone; its blocks return to the pool.
    pub(super) fn drop_inode(&mut self, ino: Ino) -> Vec<csv_core::meta::BlockRange> {
        let Some(inode) = self.inodes.remove(&ino) else {
            return Vec::new();
        };
        let exts: Vec<_> = inode.extents.into_values().collect();
        for e in &exts {
            self.free.insert(e.lun_block, e.len);
        }
        alloc::lun_ranges(&exts)
    }

    pub(super) fn create(
        &mut self,
        parent: Ino,
        name: &str,
        kind: FileKind,
        owner: Owner,
        symlink: Option<&str>,
    ) -> OpResult {
        self.vol()?;
        let p = self.dir(parent)?;
        validate_name(name)?;
        if p.entries.contains_key(name) {
            return Err(MetaError::Exists);
        }
        match (kind, symlink) {
            (FileKind::Symlink, Some("")) | (FileKind::Symlink, None) => {
                return Err(MetaError::Invalid("symlink needs a target".into()));
            }
            (FileKind::Symlink, Some(t)) if t.len() > MAX_SYMLINK_LEN || t.contains('\0') => {
                return Err(MetaError::NameTooLong);
            }
            (FileKind::Symlink, Some(_)) => {}
            (_, Some(_)) => {
                return Err(MetaError::Invalid("only symlinks have a target".into()));
            }
            (_, None) => {}
        }
        let is_dir = kind == FileKind::Dir;
        if is_dir && p.attr.nlink >= MAX_LINKS {
            return Err(MetaError::TooManyLinks);
        }
        let now = self.now_ts();
        let ino = self.next_ino;
        self.next_ino += 1;
        let attr = Attr {
            ino,
            kind,
            size: symlink.map_or(0, |t| t.len() as u64),
            perm: owner.perm & 0o7777,
            uid: owner.uid,
            gid: owner.gid,
            nlink: if is_dir { 2 } else { 1 },
            rdev: owner.rdev,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            generation: 0,
            blocks: 0,
        };
        self.inodes.insert(
            ino,
            Inode {
                attr: attr.clone(),
                parent: if is_dir { parent } else { 0 },
                entries: BTreeMap::new(),
                extents: ExtentMap::new(),
                symlink: symlink.map(str::to_string),
                xattrs: BTreeMap::new(),
            },
        );
        let p = self.node_mut(parent);
        p.entries.insert(name.to_string(), ino);
        if is_dir {
            p.attr.nlink += 1;
        }
        self.touch_dir(parent);
        Ok(Response::Attr(attr))
    }

    pub(super) fn link(&mut self, ino: Ino, new_parent: Ino, new_name: &str) -> OpResult {
        self.vol()?;
        let i = self.inode(ino)?;
        if i.is_dir() {
            return Err(MetaError::NotPermitted);
        }
        let nlink = i.attr.nlink;
        let p = self.dir(new_parent)?;
        validate_name(new_name)?;
        if p.entries.contains_key(new_name) {
            return Err(MetaError::Exists);
        }
        if nlink >= MAX_LINKS {
            return Err(MetaError::TooManyLinks);
        }
        let now = self.now_ts();
        self.node_mut(new_parent)
            .entries
            .insert(new_name.to_string(), ino);
        self.touch_dir(new_parent);
        let i = self.node_mut(ino);
        i.attr.nlink += 1;
        i.attr.ctime = now;
        Ok(Response::Attr(i.attr.clone()))
    }

    pub(super) fn unlink(&mut self, parent: Ino, name: &str) -> OpResult {
        self.vol()?;
        let p = self.dir(parent)?;
        validate_name(name)?;
        let ino = *p.entries.get(name).ok_or(MetaError::NotFound)?;
        if self.inode(ino)?.is_dir() {
            return Err(MetaError::IsDir);
        }
        self.node_mut(parent).entries.remove(name);
        self.touch_dir(parent);
        Ok(Response::Freed(self.drop_link(ino)))
    }

    /// Takes one link away from a non-directory; frees it when none is left.
    fn drop_link(&mut self, ino: Ino) -> Vec<csv_core::meta::BlockRange> {
        let now = self.now_ts();
        let i = self.node_mut(ino);
        i.attr.nlink = i.attr.nlink.saturating_sub(1);
        i.attr.ctime = now;
        if i.attr.nlink == 0 {
            self.drop_inode(ino)
        } else {
            Vec::new()
        }
    }

    pub(super) fn rmdir(&mut self, parent: Ino, name: &str) -> OpResult {
        self.vol()?;
        let p = self.dir(parent)?;
        validate_name(name)?;
        let ino = *p.entries.get(name).ok_or(MetaError::NotFound)?;
        let d = self.inode(ino)?;
        if !d.is_dir() {
            return Err(MetaError::NotDir);
        }
        if !d.entries.is_empty() {
            return Err(MetaError::NotEmpty);
        }
        let p = self.node_mut(parent);
        p.entries.remove(name);
        p.attr.nlink -= 1;
        self.touch_dir(parent);
        self.inodes.remove(&ino);
        Ok(Response::Ok)
    }

    pub(super) fn rename(
        &mut self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        flags: u32,
    ) -> OpResult {
        self.vol()?;
        let noreplace = flags & RENAME_NOREPLACE != 0;
        let exchange = flags & RENAME_EXCHANGE != 0;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 || (noreplace && exchange) {
            return Err(MetaError::Invalid(format!("rename flags {flags:#x}")));
        }
        self.dir(parent)?;
        self.dir(new_parent)?;
        validate_name(name)?;
        validate_name(new_name)?;
        let src = *self
            .dir(parent)?
            .entries
            .get(name)
            .ok_or(MetaError::NotFound)?;
        let dst = self.dir(new_parent)?.entries.get(new_name).copied();
        if parent == new_parent && name == new_name {
            return if noreplace {
                Err(MetaError::Exists)
            } else {
                Ok(Response::Freed(Vec::new()))
            };
        }
        let src_dir = self.inode(src)?.is_dir();
        if src_dir && self.is_within(new_parent, src) {
            return Err(MetaError::Invalid(
                "cannot move a directory into its own subtree".into(),
            ));
        }
        if exchange {
            let dst = dst.ok_or(MetaError::NotFound)?;
            self.exchange(parent, name, src, new_parent, new_name, dst)?;
            return Ok(Response::Freed(Vec::new()));
        }
        let mut dst_dir = false;
        if let Some(d) = dst {
            if noreplace {
                return Err(MetaError::Exists);
            }
            if d == src {
                // Two links of one inode: rename(2) does nothing.
                return Ok(Response::Freed(Vec::new()));
            }
            let di = self.inode(d)?;
            dst_dir = di.is_dir();
            match (src_dir, dst_dir) {
                (true, false) => return Err(MetaError::NotDir),
                (false, true) => return Err(MetaError::IsDir),
                (true, true) if !di.entries.is_empty() => return Err(MetaError::NotEmpty),
                _ => {}
            }
        } else if src_dir && parent != new_parent && self.inode(new_parent)?.attr.nlink >= MAX_LINKS
        {
            return Err(MetaError::TooManyLinks);
        }

        let mut freed = Vec::new();
        self.node_mut(parent).entries.remove(name);
        if let Some(d) = dst {
            if dst_dir {
                self.node_mut(new_parent).attr.nlink -= 1;
                self.inodes.remove(&d);
            } else {
                freed = self.drop_link(d);
            }
        }
        self.node_mut(new_parent)
            .entries
            .insert(new_name.to_string(), src);
        if src_dir {
            self.node_mut(parent).attr.nlink -= 1;
            self.node_mut(new_parent).attr.nlink += 1;
            self.node_mut(src).parent = new_parent;
        }
        let now = self.now_ts();
        self.node_mut(src).attr.ctime = now;
        self.touch_dir(parent);
        self.touch_dir(new_parent);
        Ok(Response::Freed(freed))
    }

    /// `RENAME_EXCHANGE`: swaps two existing entries (of any kinds).
    fn exchange(
        &mut self,
        parent: Ino,
        name: &str,
        src: Ino,
        new_parent: Ino,
        new_name: &str,
        dst: Ino,
    ) -> Result<(), MetaError> {
        let src_dir = self.inode(src)?.is_dir();
        let dst_dir = self.inode(dst)?.is_dir();
        if dst_dir && self.is_within(parent, dst) {
            return Err(MetaError::Invalid(
                "cannot move a directory into its own subtree".into(),
            ));
        }
        self.node_mut(parent).entries.insert(name.to_string(), dst);
        self.node_mut(new_parent)
            .entries
            .insert(new_name.to_string(), src);
        if parent != new_parent {
            if src_dir {
                self.node_mut(src).parent = new_parent;
                self.node_mut(parent).attr.nlink -= 1;
                self.node_mut(new_parent).attr.nlink += 1;
            }
            if dst_dir {
                self.node_mut(dst).parent = parent;
                self.node_mut(new_parent).attr.nlink -= 1;
                self.node_mut(parent).attr.nlink += 1;
            }
        }
        let now = self.now_ts();
        self.node_mut(src).attr.ctime = now;
        self.node_mut(dst).attr.ctime = now;
        self.touch_dir(parent);
        self.touch_dir(new_parent);
        Ok(())
    }

    pub(super) fn setattr(&mut self, ino: Ino, ch: AttrChange) -> OpResult {
        let bs = u64::from(self.vol()?.block_size);
        let i = self.inode(ino)?;
        if let Some(size) = ch.size {
            match i.attr.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(MetaError::IsDir),
                _ => return Err(MetaError::Invalid("size of a non-regular file".into())),
            }
            if size > MAX_FILE_SIZE {
                return Err(MetaError::FileTooBig);
            }
        }
        let now = self.now_ts();
        let mut freed = Vec::new();
        let i = self.node_mut(ino);
        if let Some(size) = ch.size {
            if size <= i.attr.size {
                // Whole blocks past the new end go; the block holding the new EOF stays.
                let removed = alloc::cut(&mut i.extents, size.div_ceil(bs), u64::MAX);
                i.attr.blocks -= removed.iter().map(|e| e.len).sum::<u64>();
                freed = removed;
            }
            if size != i.attr.size {
                i.attr.mtime = now;
            }
            i.attr.size = size;
        }
        if let Some(p) = ch.perm {
            i.attr.perm = p & 0o7777;
        }
        if let Some(u) = ch.uid {
            i.attr.uid = u;
        }
        if let Some(g) = ch.gid {
            i.attr.gid = g;
        }
        if let Some(t) = ch.atime {
            i.attr.atime = t;
        }
        if let Some(t) = ch.mtime {
            i.attr.mtime = t;
        }
        i.attr.ctime = now;
        let attr = i.attr.clone();
        for e in &freed {
            self.free.insert(e.lun_block, e.len);
        }
        Ok(Response::AttrFreed(attr, alloc::lun_ranges(&freed)))
    }

    pub(super) fn setxattr(&mut self, ino: Ino, name: &str, value: &[u8], flags: u32) -> OpResult {
        self.vol()?;
        let i = self.inode(ino)?;
        check_xattr_name(name)?;
        if value.len() > MAX_XATTR_VALUE {
            return Err(MetaError::Invalid(format!(
                "xattr value of {} bytes (max {MAX_XATTR_VALUE})",
                value.len()
            )));
        }
        let exists = i.xattrs.contains_key(name);
        match flags {
            0 => {}
            XATTR_CREATE if exists => return Err(MetaError::Exists),
            XATTR_REPLACE if !exists => return Err(MetaError::NoAttr),
            XATTR_CREATE | XATTR_REPLACE => {}
            f => return Err(MetaError::Invalid(format!("setxattr flags {f:#x}"))),
        }
        let now = self.now_ts();
        let i = self.node_mut(ino);
        i.xattrs.insert(name.to_string(), value.to_vec());
        i.attr.ctime = now;
        Ok(Response::Ok)
    }

    pub(super) fn removexattr(&mut self, ino: Ino, name: &str) -> OpResult {
        self.vol()?;
        self.inode(ino)?;
        check_xattr_name(name)?;
        let now = self.now_ts();
        let i = self.node_mut(ino);
        i.xattrs.remove(name).ok_or(MetaError::NoAttr)?;
        i.attr.ctime = now;
        Ok(Response::Ok)
    }
}

fn check_xattr_name(name: &str) -> Result<(), MetaError> {
    if name.len() > MAX_NAME_LEN {
        return Err(MetaError::NameTooLong);
    }
    if name.is_empty() || name.contains('\0') {
        return Err(MetaError::Invalid("xattr name empty or with NUL".into()));
    }
    Ok(())
}
