//! Unit tests of each operation's success and refusal paths, the fsck, determinism
//! and the cost of the hot paths on large files and directories.

use csv_core::meta::{
    Attr, BlockRange, Extent, ExtentState, FallocMode, FileKind, Ino, LockMode, MAX_FILE_SIZE,
    MetaError, PathState, PathStatus, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO, SessionId,
    Timestamp, VolumeInfo, data_lock_key,
};

use super::VolumeState;
use crate::types::{Command, Op, Response};

const BS: u64 = 4096;
const DATA_START: u64 = 10;
const TOTAL: u64 = 1010;

fn vol_info(uuid: &str) -> VolumeInfo {
    VolumeInfo {
        uuid: uuid.into(),
        block_size: BS as u32,
        total_blocks: TOTAL,
        data_start_block: DATA_START,
    }
}

/// Applies commands with an advancing clock and runs the fsck after each one.
struct H {
    s: VolumeState,
    now: u64,
}

impl H {
    fn new() -> H {
        let mut h = H {
            s: VolumeState::new(),
            now: 1000,
        };
        h.ok(Op::InitVolume {
            info: vol_info("u-1"),
        });
        h
    }

    fn run(&mut self, op: Op) -> Response {
        self.now += 1;
        let before = self.s.clone();
        let r = self.s.apply(&Command {
            now_ms: self.now,
            op: op.clone(),
            origin: None,
        });
        if let Err(v) = self.s.check_invariants() {
            panic!("invariants broken after {op:?} -> {r:?}: {v:#?}");
        }
        if let Response::Err(_) = r {
            let mut b = before;
            b.now_ms = self.s.now_ms;
            assert_eq!(b, self.s, "refused {op:?} changed the state");
        }
        r
    }

    fn ok(&mut self, op: Op) -> Response {
        let d = format!("{op:?}");
        match self.run(op) {
            Response::Err(e) => panic!("{d} refused: {e:?}"),
            r => r,
        }
    }

    fn err(&mut self, op: Op) -> MetaError {
        let d = format!("{op:?}");
        match self.run(op) {
            Response::Err(e) => e,
            r => panic!("{d} succeeded: {r:?}"),
        }
    }

    fn create(&mut self, parent: Ino, name: &str, kind: FileKind) -> Attr {
        match self.ok(create_op(parent, name, kind)) {
            Response::Attr(a) => a,
            r => panic!("{r:?}"),
        }
    }

    fn file(&mut self, name: &str) -> Ino {
        self.create(ROOT_INO, name, FileKind::File).ino
    }

    fn session(&mut self, node: u64) -> SessionId {
        match self.ok(Op::OpenSession { node, ttl_ms: 100 }) {
            Response::Session(s) => s,
            r => panic!("{r:?}"),
        }
    }

    fn reserve(&mut self, session: SessionId, blocks: u64) -> Vec<BlockRange> {
        match self.ok(Op::Reserve { session, blocks }) {
            Response::Reserved(r) => r,
            r => panic!("{r:?}"),
        }
    }

    fn lock(&mut self, session: SessionId, key: &str, mode: LockMode) -> Result<u64, MetaError> {
        match self.run(Op::Acquire {
            session,
            key: key.into(),
            mode,
        }) {
            Response::Lock(t) => Ok(t),
            Response::Err(e) => Err(e),
            r => panic!("{r:?}"),
        }
    }

    fn attr_freed(&mut self, op: Op) -> (Attr, Vec<BlockRange>) {
        match self.ok(op) {
            Response::AttrFreed(a, f) => (a, f),
            r => panic!("{r:?}"),
        }
    }

    fn attr(&self, ino: Ino) -> Attr {
        self.s.getattr(ino).unwrap()
    }
}

fn create_op(parent: Ino, name: &str, kind: FileKind) -> Op {
    Op::Create {
        parent,
        name: name.into(),
        kind,
        perm: 0o644,
        uid: 1,
        gid: 2,
        rdev: 0,
        symlink: (kind == FileKind::Symlink).then(|| "target".to_string()),
    }
}

fn written(file_block: u64, lun_block: u64, len: u64) -> Extent {
    Extent {
        file_block,
        lun_block,
        len,
        state: ExtentState::Written,
    }
}

fn commit(session: SessionId, ino: Ino, extents: Vec<Extent>, size: Option<u64>) -> Op {
    Op::CommitWrite {
        session,
        ino,
        token: None,
        extents,
        size,
        mtime: Timestamp::from_millis(5),
    }
}

fn setsize(ino: Ino, size: u64) -> Op {
    Op::SetAttr {
        ino,
        perm: None,
        uid: None,
        gid: None,
        size: Some(size),
        atime: None,
        mtime: None,
    }
}

fn rename(parent: Ino, name: &str, new_parent: Ino, new_name: &str, flags: u32) -> Op {
    Op::Rename {
        parent,
        name: name.into(),
        new_parent,
        new_name: new_name.into(),
        flags,
    }
}

fn falloc(ino: Ino, offset: u64, len: u64, mode: FallocMode) -> Op {
    Op::Fallocate {
        ino,
        offset,
        len,
        mode,
    }
}

fn r(start: u64, len: u64) -> BlockRange {
    BlockRange { start, len }
}

/// A file of `blocks` written blocks committed from a fresh reservation.
fn written_file(h: &mut H, name: &str, s: SessionId, blocks: u64) -> (Ino, BlockRange) {
    let ino = h.file(name);
    let res = h.reserve(s, blocks);
    assert_eq!(res.len(), 1);
    h.attr_freed(commit(
        s,
        ino,
        vec![written(0, res[0].start, blocks)],
        Some(blocks * BS),
    ));
    (ino, res[0])
}

// ---- volume ----------------------------------------------------------------------------

#[test]
fn init_volume_creates_root_and_pool_once() {
    let mut h = H::new();
    let root = h.attr(ROOT_INO);
    assert_eq!((root.kind, root.nlink), (FileKind::Dir, 2));
    let sp = h.s.space();
    assert_eq!((sp.data_blocks, sp.free_blocks, sp.inodes), (1000, 1000, 1));
    h.ok(Op::InitVolume {
        info: vol_info("u-1"),
    });
    assert!(matches!(
        h.err(Op::InitVolume {
            info: vol_info("u-2")
        }),
        MetaError::Invalid(_)
    ));
}

#[test]
fn ops_before_init_are_refused_with_no_volume() {
    let mut s = VolumeState::new();
    let cmd = |op| Command {
        now_ms: 1,
        op,
        origin: None,
    };
    assert_eq!(
        s.apply(&cmd(create_op(ROOT_INO, "a", FileKind::File))),
        Response::Err(MetaError::NoVolume)
    );
    let bad = VolumeInfo {
        data_start_block: TOTAL,
        ..vol_info("u")
    };
    assert!(matches!(
        s.apply(&cmd(Op::InitVolume { info: bad })),
        Response::Err(MetaError::Invalid(_))
    ));
    let bad_bs = VolumeInfo {
        block_size: 1000,
        ..vol_info("u")
    };
    assert!(matches!(
        s.apply(&cmd(Op::InitVolume { info: bad_bs })),
        Response::Err(MetaError::Invalid(_))
    ));
    assert_eq!(
        s,
        VolumeState {
            now_ms: 1,
            ..VolumeState::new()
        }
    );
}

// ---- namespace --------------------------------------------------------------------------

#[test]
fn create_sets_attrs_links_and_parent_times() {
    let mut h = H::new();
    let d = h.create(ROOT_INO, "d", FileKind::Dir);
    assert_eq!((d.nlink, d.perm, d.uid, d.gid), (2, 0o644, 1, 2));
    assert_eq!(h.attr(ROOT_INO).nlink, 3);
    assert_eq!(h.attr(ROOT_INO).mtime, Timestamp::from_millis(h.now));
    let f = h.create(d.ino, "f", FileKind::File);
    assert_eq!(f.nlink, 1);
    assert_eq!(h.attr(d.ino).nlink, 2);
    assert_eq!(h.attr(d.ino).ctime, Timestamp::from_millis(h.now));
    let l = h.create(d.ino, "l", FileKind::Symlink);
    assert_eq!(h.s.readlink(l.ino).unwrap(), "target");
    assert_eq!(l.size, 6);
    assert!(matches!(h.s.readlink(f.ino), Err(MetaError::Invalid(_))));
    assert_eq!(h.s.lookup(d.ino, "f").unwrap(), f);
    assert_eq!(h.s.resolve_path("d/f").unwrap(), f);
    assert_eq!(h.s.resolve_path("/d/./f").unwrap(), f);
    assert_eq!(h.s.resolve_path("d/../d/l").unwrap().ino, l.ino);
    assert_eq!(h.s.resolve_path("").unwrap().ino, ROOT_INO);
    assert_eq!(h.s.resolve_path("d/f/x"), Err(MetaError::NotDir));
    assert_eq!(h.s.resolve_path("d/nope"), Err(MetaError::NotFound));
}

#[test]
fn create_refusals() {
    let mut h = H::new();
    let f = h.file("f");
    assert_eq!(
        h.err(create_op(ROOT_INO, "f", FileKind::Dir)),
        MetaError::Exists
    );
    for bad in ["", ".", "..", "a/b", "a\0b"] {
        assert_eq!(
            h.err(create_op(ROOT_INO, bad, FileKind::File)),
            MetaError::InvalidName
        );
    }
    let long = "x".repeat(256);
    assert_eq!(
        h.err(create_op(ROOT_INO, &long, FileKind::File)),
        MetaError::NameTooLong
    );
    h.create(ROOT_INO, &"x".repeat(255), FileKind::File);
    assert_eq!(h.err(create_op(f, "a", FileKind::File)), MetaError::NotDir);
    assert_eq!(
        h.err(create_op(999, "a", FileKind::File)),
        MetaError::NotFound
    );
    let mut no_target = create_op(ROOT_INO, "l", FileKind::Symlink);
    if let Op::Create { symlink, .. } = &mut no_target {
        *symlink = None;
    }
    assert!(matches!(h.err(no_target), MetaError::Invalid(_)));
    let mut long_target = create_op(ROOT_INO, "l", FileKind::Symlink);
    if let Op::Create { symlink, .. } = &mut long_target {
        *symlink = Some("t".repeat(4096));
    }
    assert_eq!(h.err(long_target), MetaError::NameTooLong);
}

#[test]
fn link_counts_and_refuses_directories() {
    let mut h = H::new();
    let f = h.file("f");
    let d = h.create(ROOT_INO, "d", FileKind::Dir).ino;
    let a = match h.ok(Op::Link {
        ino: f,
        new_parent: d,
        new_name: "g".into(),
    }) {
        Response::Attr(a) => a,
        r => panic!("{r:?}"),
    };
    assert_eq!(a.nlink, 2);
    assert_eq!(h.s.lookup(d, "g").unwrap().ino, f);
    let link = |ino, name: &str| Op::Link {
        ino,
        new_parent: ROOT_INO,
        new_name: name.into(),
    };
    assert_eq!(h.err(link(d, "d2")), MetaError::NotPermitted);
    assert_eq!(h.err(link(f, "d")), MetaError::Exists);
    assert_eq!(h.err(link(777, "z")), MetaError::NotFound);
}

#[test]
fn unlink_frees_blocks_only_with_the_last_link() {
    let mut h = H::new();
    let s = h.session(1);
    let (f, res) = written_file(&mut h, "f", s, 8);
    h.ok(Op::Link {
        ino: f,
        new_parent: ROOT_INO,
        new_name: "g".into(),
    });
    let free0 = h.s.space().free_blocks;
    let unlink = |name: &str| Op::Unlink {
        parent: ROOT_INO,
        name: name.into(),
    };
    assert_eq!(h.ok(unlink("f")), Response::Freed(vec![]));
    assert_eq!(h.attr(f).nlink, 1);
    assert_eq!(h.ok(unlink("g")), Response::Freed(vec![res]));
    assert_eq!(h.s.space().free_blocks, free0 + 8);
    assert_eq!(h.s.getattr(f), Err(MetaError::NotFound));
    assert_eq!(h.err(unlink("g")), MetaError::NotFound);
    h.create(ROOT_INO, "d", FileKind::Dir);
    assert_eq!(h.err(unlink("d")), MetaError::IsDir);
}

#[test]
fn rmdir_needs_an_empty_directory() {
    let mut h = H::new();
    let d = h.create(ROOT_INO, "d", FileKind::Dir).ino;
    h.create(d, "f", FileKind::File);
    let rmdir = |parent, name: &str| Op::Rmdir {
        parent,
        name: name.into(),
    };
    assert_eq!(h.err(rmdir(ROOT_INO, "d")), MetaError::NotEmpty);
    assert_eq!(h.err(rmdir(d, "f")), MetaError::NotDir);
    assert_eq!(h.err(rmdir(ROOT_INO, "x")), MetaError::NotFound);
    h.ok(Op::Unlink {
        parent: d,
        name: "f".into(),
    });
    h.ok(rmdir(ROOT_INO, "d"));
    assert_eq!(h.attr(ROOT_INO).nlink, 2);
    assert_eq!(h.s.space().inodes, 1);
}

#[test]
fn rename_moves_directories_and_fixes_link_counts() {
    let mut h = H::new();
    let a = h.create(ROOT_INO, "a", FileKind::Dir).ino;
    let b = h.create(ROOT_INO, "b", FileKind::Dir).ino;
    let c = h.create(a, "c", FileKind::Dir).ino;
    h.ok(rename(a, "c", b, "c2", 0));
    assert_eq!((h.attr(a).nlink, h.attr(b).nlink), (2, 3));
    assert_eq!(h.s.resolve_path("b/c2").unwrap().ino, c);
    assert_eq!(h.s.resolve_path("b/c2/..").unwrap().ino, b);
    assert_eq!(h.attr(a).mtime, Timestamp::from_millis(h.now));
    // Into its own subtree, or onto itself.
    assert!(matches!(
        h.err(rename(ROOT_INO, "b", c, "x", 0)),
        MetaError::Invalid(_)
    ));
    assert!(matches!(
        h.err(rename(ROOT_INO, "b", b, "x", 0)),
        MetaError::Invalid(_)
    ));
    assert_eq!(
        h.ok(rename(ROOT_INO, "b", ROOT_INO, "b", 0)),
        Response::Freed(vec![])
    );
    assert_eq!(
        h.err(rename(ROOT_INO, "b", ROOT_INO, "b", RENAME_NOREPLACE)),
        MetaError::Exists
    );
    assert_eq!(
        h.err(rename(ROOT_INO, "zz", ROOT_INO, "y", 0)),
        MetaError::NotFound
    );
    assert!(matches!(
        h.err(rename(ROOT_INO, "a", ROOT_INO, "y", 4)),
        MetaError::Invalid(_)
    ));
    assert!(matches!(
        h.err(rename(ROOT_INO, "a", ROOT_INO, "y", 3)),
        MetaError::Invalid(_)
    ));
}

#[test]
fn rename_replaces_compatible_targets_only() {
    let mut h = H::new();
    let s = h.session(1);
    let (f, _) = written_file(&mut h, "f", s, 2);
    let (_, gres) = written_file(&mut h, "g", s, 3);
    let d = h.create(ROOT_INO, "d", FileKind::Dir).ino;
    let e = h.create(ROOT_INO, "e", FileKind::Dir).ino;
    h.create(e, "inner", FileKind::File);
    assert_eq!(
        h.err(rename(ROOT_INO, "f", ROOT_INO, "d", 0)),
        MetaError::IsDir
    );
    assert_eq!(
        h.err(rename(ROOT_INO, "d", ROOT_INO, "f", 0)),
        MetaError::NotDir
    );
    assert_eq!(
        h.err(rename(ROOT_INO, "d", ROOT_INO, "e", 0)),
        MetaError::NotEmpty
    );
    assert_eq!(
        h.err(rename(ROOT_INO, "f", ROOT_INO, "g", RENAME_NOREPLACE)),
        MetaError::Exists
    );
    // Replacing g frees its blocks.
    assert_eq!(
        h.ok(rename(ROOT_INO, "f", ROOT_INO, "g", 0)),
        Response::Freed(vec![gres])
    );
    assert_eq!(h.s.lookup(ROOT_INO, "g").unwrap().ino, f);
    assert_eq!(h.s.lookup(ROOT_INO, "f"), Err(MetaError::NotFound));
    // Replacing an empty directory.
    h.ok(Op::Unlink {
        parent: e,
        name: "inner".into(),
    });
    h.ok(rename(ROOT_INO, "d", ROOT_INO, "e", 0));
    assert_eq!(h.s.lookup(ROOT_INO, "e").unwrap().ino, d);
    assert_eq!(h.attr(ROOT_INO).nlink, 3);
    // Two links of one inode: nothing happens.
    h.ok(Op::Link {
        ino: f,
        new_parent: ROOT_INO,
        new_name: "h".into(),
    });
    h.ok(rename(ROOT_INO, "g", ROOT_INO, "h", 0));
    assert_eq!(h.s.lookup(ROOT_INO, "g").unwrap().nlink, 2);
}

#[test]
fn rename_exchange_swaps_entries_of_any_kind() {
    let mut h = H::new();
    let a = h.create(ROOT_INO, "a", FileKind::Dir).ino;
    let b = h.create(ROOT_INO, "b", FileKind::Dir).ino;
    let sub = h.create(a, "sub", FileKind::Dir).ino;
    let f = h.create(b, "f", FileKind::File).ino;
    h.ok(rename(a, "sub", b, "f", RENAME_EXCHANGE));
    assert_eq!(h.s.lookup(a, "sub").unwrap().ino, f);
    assert_eq!(h.s.lookup(b, "f").unwrap().ino, sub);
    assert_eq!((h.attr(a).nlink, h.attr(b).nlink), (2, 3));
    assert_eq!(h.s.resolve_path("b/f/..").unwrap().ino, b);
    assert_eq!(
        h.err(rename(a, "sub", b, "nope", RENAME_EXCHANGE)),
        MetaError::NotFound
    );
    // Swapping a directory with something inside it would make a cycle.
    h.create(sub, "x", FileKind::File);
    assert!(matches!(
        h.err(rename(ROOT_INO, "b", sub, "x", RENAME_EXCHANGE)),
        MetaError::Invalid(_)
    ));
    assert!(matches!(
        h.err(rename(sub, "x", ROOT_INO, "b", RENAME_EXCHANGE)),
        MetaError::Invalid(_)
    ));
}

#[test]
fn readdir_is_sorted_and_pages() {
    let mut h = H::new();
    for n in ["c", "a", "b", "d"] {
        h.file(n);
    }
    let names =
        |v: Vec<csv_core::meta::DirEntry>| v.into_iter().map(|e| e.name).collect::<Vec<_>>();
    assert_eq!(
        names(h.s.readdir(ROOT_INO, None, 10).unwrap()),
        ["a", "b", "c", "d"]
    );
    assert_eq!(
        names(h.s.readdir(ROOT_INO, Some("a"), 2).unwrap()),
        ["b", "c"]
    );
    assert_eq!(
        names(h.s.readdir(ROOT_INO, Some("bb"), 10).unwrap()),
        ["c", "d"]
    );
    let f = h.s.lookup(ROOT_INO, "a").unwrap().ino;
    assert_eq!(h.s.readdir(f, None, 1), Err(MetaError::NotDir));
}

#[test]
fn truncate_frees_whole_blocks_past_eof_and_extends_sparsely() {
    let mut h = H::new();
    let s = h.session(1);
    let (f, res) = written_file(&mut h, "f", s, 10);
    // New EOF inside block 3: blocks 0..4 stay.
    let (a, freed) = h.attr_freed(setsize(f, 3 * BS + 1));
    assert_eq!(freed, vec![r(res.start + 4, 6)]);
    assert_eq!((a.size, a.blocks), (3 * BS + 1, 4));
    let (a, freed) = h.attr_freed(setsize(f, 100 * BS));
    assert_eq!((a.size, a.blocks, freed), (100 * BS, 4, vec![]));
    let (a, freed) = h.attr_freed(setsize(f, 0));
    assert_eq!((a.blocks, freed), (0, vec![r(res.start, 4)]));
    assert_eq!(h.err(setsize(f, MAX_FILE_SIZE + 1)), MetaError::FileTooBig);
    assert_eq!(h.err(setsize(ROOT_INO, 0)), MetaError::IsDir);
    let (a, _) = h.attr_freed(Op::SetAttr {
        ino: f,
        perm: Some(0o100_600),
        uid: Some(7),
        gid: Some(8),
        size: None,
        atime: Some(Timestamp::from_millis(1)),
        mtime: Some(Timestamp::from_millis(2)),
    });
    assert_eq!((a.perm, a.uid, a.gid), (0o600, 7, 8));
    assert_eq!(a.mtime, Timestamp::from_millis(2));
    assert_eq!(a.ctime, Timestamp::from_millis(h.now));
}

#[test]
fn xattrs_follow_create_and_replace_flags() {
    let mut h = H::new();
    let f = h.file("f");
    let set = |name: &str, v: &[u8], flags| Op::SetXattr {
        ino: f,
        name: name.into(),
        value: v.to_vec(),
        flags,
    };
    assert_eq!(h.err(set("user.a", b"1", 2)), MetaError::NoAttr);
    h.ok(set("user.b", b"1", 1));
    assert_eq!(h.err(set("user.b", b"2", 1)), MetaError::Exists);
    h.ok(set("user.b", b"2", 2));
    h.ok(set("user.a", b"", 0));
    assert!(matches!(
        h.err(set("user.c", b"", 4)),
        MetaError::Invalid(_)
    ));
    assert!(matches!(h.err(set("", b"", 0)), MetaError::Invalid(_)));
    assert!(matches!(
        h.err(set("user.big", &vec![0; 64 * 1024 + 1], 0)),
        MetaError::Invalid(_)
    ));
    assert_eq!(h.s.getxattr(f, "user.b").unwrap(), b"2");
    assert_eq!(h.s.listxattr(f).unwrap(), ["user.a", "user.b"]);
    let rm = |name: &str| Op::RemoveXattr {
        ino: f,
        name: name.into(),
    };
    h.ok(rm("user.a"));
    assert_eq!(h.err(rm("user.a")), MetaError::NoAttr);
    assert_eq!(h.s.getxattr(f, "user.a"), Err(MetaError::NoAttr));
}

// ---- allocation ------------------------------------------------------------------------

#[test]
fn reserve_takes_lowest_first_fit_then_largest_ranges() {
    let mut h = H::new();
    let s = h.session(1);
    assert_eq!(h.reserve(s, 10), vec![r(DATA_START, 10)]);
    assert_eq!(h.reserve(s, 5), vec![r(DATA_START + 10, 5)]);
    // Give back holes of 3 and 2 blocks: a 2-block request fits the lowest hole.
    h.ok(Op::Unreserve {
        session: s,
        ranges: vec![r(DATA_START + 1, 3), r(DATA_START + 6, 2)],
    });
    assert_eq!(h.reserve(s, 2), vec![r(DATA_START + 1, 2)]);
    // Holes now: 1 block at 13, 2 at 16, the tail of 985 at 25.
    assert_eq!(h.reserve(s, 2), vec![r(DATA_START + 6, 2)]);
    let s2 = h.session(2);
    // Pool: 1 block at 13 and 985 at 25; asking for more than the tail takes it first.
    assert_eq!(
        h.reserve(s2, 986),
        vec![r(DATA_START + 3, 1), r(DATA_START + 15, 985)]
    );
    assert_eq!(
        h.err(Op::Reserve {
            session: s2,
            blocks: 1
        }),
        MetaError::NoSpace
    );
    assert!(matches!(
        h.err(Op::Reserve {
            session: s2,
            blocks: 0
        }),
        MetaError::Invalid(_)
    ));
    assert_eq!(
        h.err(Op::Reserve {
            session: 99,
            blocks: 1
        }),
        MetaError::SessionExpired(99)
    );
    assert_eq!(h.s.space().reserved_blocks, 1000);
}

#[test]
fn reserve_gives_what_is_left_when_short() {
    let mut h = H::new();
    let s = h.session(1);
    h.reserve(s, 995);
    assert_eq!(h.reserve(s, 10), vec![r(DATA_START + 995, 5)]);
}

#[test]
fn unreserve_only_returns_own_reserved_blocks() {
    let mut h = H::new();
    let s1 = h.session(1);
    let s2 = h.session(2);
    let a = h.reserve(s1, 4)[0];
    let unres = |session, ranges| Op::Unreserve { session, ranges };
    assert!(matches!(h.err(unres(s2, vec![a])), MetaError::Invalid(_)));
    assert!(matches!(
        h.err(unres(s1, vec![r(a.start, 5)])),
        MetaError::Invalid(_)
    ));
    assert!(matches!(
        h.err(unres(s1, vec![r(a.start, 2), r(a.start + 1, 1)])),
        MetaError::Invalid(_)
    ));
    assert!(matches!(
        h.err(unres(s1, vec![r(u64::MAX, 2)])),
        MetaError::Invalid(_)
    ));
    h.ok(unres(s1, vec![r(a.start + 1, 2)]));
    assert_eq!(h.s.reservations(s1), vec![r(a.start, 1), r(a.start + 3, 1)]);
    assert_eq!(h.s.space().free_blocks, 998);
}

#[test]
fn commit_maps_reserved_blocks_and_consumes_the_reservation() {
    let mut h = H::new();
    let s = h.session(1);
    let f = h.file("f");
    let res = h.reserve(s, 8)[0];
    let (a, freed) = h.attr_freed(commit(
        s,
        f,
        vec![written(0, res.start, 2), written(2, res.start + 2, 2)],
        Some(4 * BS - 10),
    ));
    assert_eq!((a.size, a.blocks, freed), (4 * BS - 10, 4, vec![]));
    assert_eq!(a.mtime, Timestamp::from_millis(5));
    // Contiguous extents merged.
    assert_eq!(
        h.s.extents(f, 0, 100).unwrap(),
        vec![written(0, res.start, 4)]
    );
    assert_eq!(h.s.reservations(s), vec![r(res.start + 4, 4)]);
    // Size never shrinks.
    let (a, _) = h.attr_freed(commit(s, f, vec![], Some(10)));
    assert_eq!(a.size, 4 * BS - 10);
    // Overwrite blocks 1..3 with new blocks: the old ones go back to the pool.
    let (a, freed) = h.attr_freed(commit(s, f, vec![written(1, res.start + 4, 2)], None));
    assert_eq!((a.blocks, freed), (4, vec![r(res.start + 1, 2)]));
    assert_eq!(
        h.s.extents(f, 2, 1).unwrap(),
        vec![written(1, res.start + 4, 2)]
    );
    assert_eq!(h.s.extents(f, 0, 4).unwrap().len(), 3);
    // Rewriting the same mapping (and mixing in reserved blocks) frees nothing.
    let (a, freed) = h.attr_freed(commit(
        s,
        f,
        vec![
            written(1, res.start + 4, 2),
            written(3, res.start + 3, 1),
            written(4, res.start + 6, 1),
        ],
        None,
    ));
    assert_eq!((a.blocks, freed), (5, vec![]));
    assert_eq!(h.s.reservations(s), vec![r(res.start + 7, 1)]);
    // The freed blocks are really back in the pool: committing them is refused.
    assert!(matches!(
        h.err(commit(s, f, vec![written(1, res.start + 1, 1)], None)),
        MetaError::Invalid(_)
    ));
}

#[test]
fn commit_refuses_blocks_it_was_not_given() {
    let mut h = H::new();
    let s1 = h.session(1);
    let s2 = h.session(2);
    let f = h.file("f");
    let mine = h.reserve(s1, 4)[0];
    let theirs = h.reserve(s2, 4)[0];
    let bad = |h: &mut H, ext: Extent| h.err(commit(s1, f, vec![ext], None));
    assert!(matches!(
        bad(&mut h, written(0, theirs.start, 1)),
        MetaError::Invalid(_)
    ));
    assert!(matches!(
        bad(&mut h, written(0, 500, 1)),
        MetaError::Invalid(_)
    ));
    assert!(matches!(
        bad(&mut h, written(0, mine.start, 5)),
        MetaError::Invalid(_)
    ));
    assert!(matches!(
        bad(&mut h, written(0, 0, 1)),
        MetaError::Invalid(_)
    ));
    assert!(matches!(
        bad(&mut h, written(0, mine.start, 0)),
        MetaError::Invalid(_)
    ));
    let unwritten = Extent {
        state: ExtentState::Unwritten,
        ..written(0, mine.start, 1)
    };
    assert!(matches!(bad(&mut h, unwritten), MetaError::Invalid(_)));
    assert_eq!(
        bad(&mut h, written(MAX_FILE_SIZE / BS, mine.start, 1)),
        MetaError::FileTooBig
    );
    assert!(matches!(
        h.err(commit(
            s1,
            f,
            vec![written(0, mine.start, 2), written(1, mine.start + 2, 1)],
            None
        )),
        MetaError::Invalid(_)
    ));
    assert!(matches!(
        h.err(commit(
            s1,
            f,
            vec![written(0, mine.start, 2), written(5, mine.start + 1, 1)],
            None
        )),
        MetaError::Invalid(_)
    ));
    assert_eq!(
        h.err(commit(9, f, vec![], None)),
        MetaError::SessionExpired(9)
    );
    assert_eq!(h.err(commit(s1, ROOT_INO, vec![], None)), MetaError::IsDir);
    assert_eq!(h.err(commit(s1, 555, vec![], None)), MetaError::NotFound);
    // A file's own block moved to another offset would be mapped twice.
    h.attr_freed(commit(s1, f, vec![written(0, mine.start, 1)], None));
    assert!(matches!(
        bad(&mut h, written(3, mine.start, 1)),
        MetaError::Invalid(_)
    ));
    // Another file's block.
    let g = h.file("g");
    assert!(matches!(
        h.err(commit(s1, g, vec![written(0, mine.start, 1)], None)),
        MetaError::Invalid(_)
    ));
}

#[test]
fn commit_converts_fallocated_blocks_in_place() {
    let mut h = H::new();
    let s = h.session(1);
    let f = h.file("f");
    let (a, _) = h.attr_freed(falloc(
        f,
        0,
        4 * BS,
        FallocMode::Allocate { keep_size: false },
    ));
    assert_eq!((a.size, a.blocks), (4 * BS, 4));
    let e = h.s.extents(f, 0, 4).unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].state, ExtentState::Unwritten);
    let lun = e[0].lun_block;
    let (a, freed) = h.attr_freed(commit(s, f, vec![written(1, lun + 1, 2)], None));
    assert_eq!((a.blocks, freed), (4, vec![]));
    let states: Vec<_> =
        h.s.extents(f, 0, 4)
            .unwrap()
            .iter()
            .map(|e| e.state)
            .collect();
    assert_eq!(
        states,
        [
            ExtentState::Unwritten,
            ExtentState::Written,
            ExtentState::Unwritten
        ]
    );
}

#[test]
fn commit_with_a_token_is_fenced_unless_it_is_the_current_exclusive_grant() {
    let mut h = H::new();
    let s1 = h.session(1);
    let s2 = h.session(2);
    let f = h.file("f");
    let key = data_lock_key(f);
    let fenced = |h: &mut H, session, token| {
        h.err(Op::CommitWrite {
            session,
            ino: f,
            token: Some(token),
            extents: vec![],
            size: Some(1),
            mtime: Timestamp::default(),
        })
    };
    assert_eq!(
        fenced(&mut h, s1, 1),
        MetaError::Fenced {
            given: 1,
            current: 0
        }
    );
    let t1 = h.lock(s1, &key, LockMode::Exclusive).unwrap();
    h.attr_freed(Op::CommitWrite {
        session: s1,
        ino: f,
        token: Some(t1),
        extents: vec![],
        size: Some(1),
        mtime: Timestamp::default(),
    });
    assert_eq!(
        fenced(&mut h, s2, t1),
        MetaError::Fenced {
            given: t1,
            current: t1
        }
    );
    h.ok(Op::Release {
        session: s1,
        key: key.clone(),
    });
    let t2 = h.lock(s2, &key, LockMode::Exclusive).unwrap();
    assert!(t2 > t1);
    assert_eq!(
        fenced(&mut h, s1, t1),
        MetaError::Fenced {
            given: t1,
            current: t2
        }
    );
    h.ok(Op::Release {
        session: s2,
        key: key.clone(),
    });
    let t3 = h.lock(s2, &key, LockMode::Shared).unwrap();
    assert_eq!(
        fenced(&mut h, s2, t3),
        MetaError::Fenced {
            given: t3,
            current: t3
        }
    );
}

#[test]
fn fallocate_modes() {
    let mut h = H::new();
    let s = h.session(1);
    let (f, res) = written_file(&mut h, "f", s, 4);
    // Allocate past EOF keeping the size: holes only.
    let (a, freed) = h.attr_freed(falloc(
        f,
        2 * BS,
        6 * BS,
        FallocMode::Allocate { keep_size: true },
    ));
    assert_eq!((a.size, a.blocks, freed), (4 * BS, 8, vec![]));
    // Punch: only whole blocks inside [BS/2, 3*BS) go, i.e. blocks 1 and 2.
    let (a, freed) = h.attr_freed(falloc(f, BS / 2, 3 * BS - BS / 2, FallocMode::PunchHole));
    assert_eq!(
        (a.size, a.blocks, freed),
        (4 * BS, 6, vec![r(res.start + 1, 2)])
    );
    // Zero range [BS, 5*BS + 1): blocks 1..5 whole, 5 partial; holes 1, 2 allocated.
    let (a, freed) = h.attr_freed(falloc(
        f,
        BS,
        4 * BS + 1,
        FallocMode::ZeroRange { keep_size: false },
    ));
    assert_eq!((a.size, a.blocks, freed), (5 * BS + 1, 8, vec![]));
    let ext = h.s.extents(f, 0, 100).unwrap();
    assert_eq!(ext[0], written(0, res.start, 1));
    assert!(ext[1..].iter().all(|e| e.file_block >= 1));
    let state_at = |fb: u64| {
        ext.iter()
            .find(|e| e.file_block <= fb && fb < e.file_end())
            .map(|e| e.state)
    };
    assert_eq!(state_at(3), Some(ExtentState::Unwritten));
    assert_eq!(state_at(7), Some(ExtentState::Unwritten));
    assert_eq!(
        h.err(falloc(
            f,
            0,
            2000 * BS,
            FallocMode::Allocate { keep_size: false }
        )),
        MetaError::NoSpace
    );
    assert!(matches!(
        h.err(falloc(f, 0, 0, FallocMode::PunchHole)),
        MetaError::Invalid(_)
    ));
    assert_eq!(
        h.err(falloc(f, MAX_FILE_SIZE, 1, FallocMode::PunchHole)),
        MetaError::FileTooBig
    );
    assert_eq!(
        h.err(falloc(f, u64::MAX, 2, FallocMode::PunchHole)),
        MetaError::FileTooBig
    );
    assert_eq!(
        h.err(falloc(ROOT_INO, 0, 1, FallocMode::PunchHole)),
        MetaError::IsDir
    );
}

#[test]
fn extents_returns_whole_overlapping_extents_in_order() {
    let mut h = H::new();
    let s = h.session(1);
    let f = h.file("f");
    let res = h.reserve(s, 10)[0];
    h.attr_freed(commit(
        s,
        f,
        vec![written(0, res.start, 2), written(5, res.start + 5, 3)],
        None,
    ));
    assert_eq!(
        h.s.extents(f, 1, 1).unwrap(),
        vec![written(0, res.start, 2)]
    );
    assert_eq!(h.s.extents(f, 2, 3).unwrap(), vec![]);
    assert_eq!(
        h.s.extents(f, 2, 4).unwrap(),
        vec![written(5, res.start + 5, 3)]
    );
    assert_eq!(h.s.extents(f, 0, u64::MAX).unwrap().len(), 2);
    assert_eq!(h.s.extents(777, 0, 1), Err(MetaError::NotFound));
}

// ---- sessions, nodes, locks ------------------------------------------------------------

#[test]
fn one_session_per_node_and_ending_it_releases_everything() {
    let mut h = H::new();
    h.ok(Op::RegisterNode {
        node: 1,
        rpc_addr: "r".into(),
        nbd_addr: "n".into(),
        mount: "m".into(),
    });
    let s1 = h.session(1);
    h.reserve(s1, 10);
    h.lock(s1, "k", LockMode::Exclusive).unwrap();
    assert_eq!(h.s.node(1).unwrap().session, Some(s1));
    let s2 = h.session(1);
    assert!(s2 > s1);
    assert_eq!(h.s.session(s1), None);
    assert_eq!(h.s.lock("k"), None);
    assert_eq!(h.s.reservations(s1), vec![]);
    assert_eq!(h.s.space().free_blocks, 1000);
    assert_eq!(h.s.node(1).unwrap().session, Some(s2));
    h.reserve(s2, 3);
    h.lock(s2, "k", LockMode::Shared).unwrap();
    h.ok(Op::CloseSession { session: s2 });
    assert_eq!(h.s.sessions().count(), 0);
    assert_eq!(h.s.locks(), vec![]);
    assert_eq!(h.s.space().free_blocks, 1000);
    assert_eq!(h.s.node(1).unwrap().session, None);
    assert_eq!(
        h.err(Op::CloseSession { session: s2 }),
        MetaError::SessionExpired(s2)
    );
    assert!(matches!(
        h.err(Op::OpenSession { node: 1, ttl_ms: 0 }),
        MetaError::Invalid(_)
    ));
}

#[test]
fn tick_expires_sessions_strictly_past_their_deadline() {
    let mut h = H::new();
    let s1 = h.session(1); // expires at now + 100
    let exp = h.s.session(s1).unwrap().expires_at_ms;
    let s2 = h.session(2);
    h.lock(s1, "k", LockMode::Shared).unwrap();
    h.lock(s2, "k", LockMode::Shared).unwrap();
    h.now = exp - 1; // the next command runs at `exp`
    assert_eq!(h.ok(Op::Tick), Response::Expired(vec![]));
    h.ok(Op::KeepAlive { session: s2 });
    assert_eq!(h.ok(Op::Tick), Response::Expired(vec![s1]));
    assert_eq!(h.s.lock("k").unwrap().holders.len(), 1);
    assert_eq!(
        h.err(Op::KeepAlive { session: s1 }),
        MetaError::SessionExpired(s1)
    );
    assert_eq!(
        h.err(Op::Acquire {
            session: s1,
            key: "k".into(),
            mode: LockMode::Shared
        }),
        MetaError::SessionExpired(s1)
    );
}

#[test]
fn extend_sessions_gives_every_session_a_full_ttl() {
    let mut h = H::new();
    let s = h.session(1);
    h.now += 1000;
    h.ok(Op::ExtendSessions);
    assert_eq!(h.s.session(s).unwrap().expires_at_ms, h.now + 100);
    assert_eq!(h.ok(Op::Tick), Response::Expired(vec![]));
    // A later deadline is kept.
    h.ok(Op::OpenSession {
        node: 2,
        ttl_ms: 10_000,
    });
    h.ok(Op::ExtendSessions);
    assert_eq!(
        h.s.sessions().map(|s| s.expires_at_ms).max(),
        Some(h.now + 10_000)
    );
}

#[test]
fn nodes_register_update_report_paths_and_leave() {
    let mut h = H::new();
    let reg = |rpc: &str| Op::RegisterNode {
        node: 3,
        rpc_addr: rpc.into(),
        nbd_addr: "nbd".into(),
        mount: "/mnt".into(),
    };
    let s = h.session(3);
    h.ok(reg("a"));
    assert_eq!(h.s.node(3).unwrap().session, Some(s));
    let status = PathStatus {
        state: PathState::Redirected,
        reason: Some("no disk connectivity".into()),
        since_ms: 7,
        peer: Some(1),
    };
    h.ok(Op::SetPathStatus {
        node: 3,
        status: status.clone(),
    });
    h.ok(reg("b"));
    let rec = h.s.node(3).unwrap().clone();
    assert_eq!((rec.rpc_addr.as_str(), &rec.path), ("b", &status));
    h.ok(Op::KeepAlive { session: s });
    assert_eq!(h.s.node(3).unwrap().last_heartbeat_ms, h.now);
    assert_eq!(
        h.err(Op::SetPathStatus { node: 4, status }),
        MetaError::NotFound
    );
    h.ok(Op::RemoveNode { node: 3 });
    assert_eq!((h.s.nodes(), h.s.session(s)), (vec![], None));
    assert_eq!(h.err(Op::RemoveNode { node: 3 }), MetaError::NotFound);
    assert!(matches!(
        h.err(Op::RegisterNode {
            node: 0,
            rpc_addr: String::new(),
            nbd_addr: String::new(),
            mount: String::new()
        }),
        MetaError::Invalid(_)
    ));
}

#[test]
fn locks_shared_exclusive_upgrade_and_tokens() {
    let mut h = H::new();
    let a = h.session(1);
    let b = h.session(2);
    let busy = Err(MetaError::LockBusy { key: "k".into() });
    let ta = h.lock(a, "k", LockMode::Shared).unwrap();
    assert_eq!(h.lock(a, "k", LockMode::Shared), Ok(ta));
    let tb = h.lock(b, "k", LockMode::Shared).unwrap();
    assert!(tb > ta);
    assert_eq!(h.lock(a, "k", LockMode::Exclusive), busy);
    h.ok(Op::Release {
        session: b,
        key: "k".into(),
    });
    let tu = h.lock(a, "k", LockMode::Exclusive).unwrap();
    assert!(tu > tb);
    assert_eq!(h.lock(a, "k", LockMode::Exclusive), Ok(tu));
    assert_eq!(h.lock(a, "k", LockMode::Shared), Ok(tu));
    assert_eq!(h.lock(b, "k", LockMode::Shared), busy);
    assert_eq!(h.lock(b, "k", LockMode::Exclusive), busy);
    let other = h.lock(b, "other", LockMode::Exclusive).unwrap();
    assert!(other > tu);
    assert_eq!(h.s.last_token(), other);
    let info = h.s.lock("k").unwrap();
    assert_eq!(info.holders.len(), 1);
    assert_eq!(
        (info.holders[0].node, info.holders[0].mode),
        (1, LockMode::Exclusive)
    );
    assert!(matches!(
        h.lock(a, "", LockMode::Shared),
        Err(MetaError::Invalid(_))
    ));
    // Release of something not held is a no-op.
    h.ok(Op::Release {
        session: b,
        key: "k".into(),
    });
    assert_eq!(h.s.lock("k").unwrap().holders.len(), 1);
}

#[test]
fn break_requests_are_recorded_and_cleared_with_the_last_holder() {
    let mut h = H::new();
    let a = h.session(1);
    let brk = || Op::RequestBreak {
        key: "k".into(),
        requester: 2,
    };
    assert_eq!(h.err(brk()), MetaError::NotFound);
    h.lock(a, "k", LockMode::Exclusive).unwrap();
    h.ok(brk());
    assert_eq!(h.s.lock("k").unwrap().break_requested_by, Some(2));
    h.ok(Op::Release {
        session: a,
        key: "k".into(),
    });
    assert_eq!(h.s.lock("k"), None);
    h.lock(a, "k", LockMode::Exclusive).unwrap();
    assert_eq!(h.s.lock("k").unwrap().break_requested_by, None);
}

// ---- fsck ------------------------------------------------------------------------------

fn corrupt(f: impl FnOnce(&mut VolumeState)) -> Vec<String> {
    let mut h = H::new();
    let s = h.session(1);
    written_file(&mut h, "f", s, 4);
    h.create(ROOT_INO, "d", FileKind::Dir);
    h.lock(s, "k", LockMode::Exclusive).unwrap();
    h.reserve(s, 3);
    let mut st = h.s.clone();
    f(&mut st);
    st.check_invariants().expect_err("corruption not detected")
}

#[test]
fn fsck_reports_leaks_double_ownership_and_bad_counts() {
    let errs = corrupt(|s| {
        let start = s.free.iter().next().unwrap().start;
        s.free.remove(start, 1);
    });
    assert!(errs.iter().any(|e| e.contains("leaked")), "{errs:?}");

    let errs = corrupt(|s| {
        let ext = *s.inodes.get(&2).unwrap().extents.values().next().unwrap();
        let r = s.sessions.values_mut().next().unwrap();
        r.reserved.insert(ext.lun_block, 1);
    });
    assert!(errs.iter().any(|e| e.contains("also owned")), "{errs:?}");

    let errs = corrupt(|s| s.inodes.get_mut(&2).unwrap().attr.blocks = 9);
    assert!(errs.iter().any(|e| e.contains("attr.blocks")), "{errs:?}");

    let errs = corrupt(|s| s.inodes.get_mut(&ROOT_INO).unwrap().attr.nlink = 2);
    assert!(
        errs.iter().any(|e| e.contains("subdirectories")),
        "{errs:?}"
    );

    let errs = corrupt(|s| {
        s.inodes.get_mut(&ROOT_INO).unwrap().entries.remove("f");
    });
    assert!(errs.iter().any(|e| e.contains("orphan")), "{errs:?}");

    let errs = corrupt(|s| {
        s.inodes
            .get_mut(&ROOT_INO)
            .unwrap()
            .entries
            .insert("z".into(), 99);
    });
    assert!(errs.iter().any(|e| e.contains("missing inode")), "{errs:?}");

    let errs = corrupt(|s| {
        s.sessions.clear();
    });
    assert!(errs.iter().any(|e| e.contains("dead session")), "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("leaked")), "{errs:?}");

    let errs = corrupt(|s| s.last_token = 0);
    assert!(errs.iter().any(|e| e.contains("token")), "{errs:?}");
}

// ---- determinism and scale -------------------------------------------------------------

fn scripted_commands() -> Vec<Command> {
    let mut ops = vec![
        Op::InitVolume {
            info: vol_info("u-1"),
        },
        Op::OpenSession {
            node: 1,
            ttl_ms: 50,
        },
        Op::OpenSession {
            node: 2,
            ttl_ms: 1_000_000,
        },
        Op::Reserve {
            session: 1,
            blocks: 64,
        },
        Op::Acquire {
            session: 1,
            key: data_lock_key(2),
            mode: LockMode::Exclusive,
        },
    ];
    for i in 0..40u64 {
        ops.push(create_op(ROOT_INO, &format!("f{i}"), FileKind::File));
        ops.push(Op::SetXattr {
            ino: 2 + i,
            name: format!("user.{}", i % 3),
            value: vec![i as u8; 3],
            flags: 0,
        });
        if i < 16 {
            ops.push(Op::CommitWrite {
                session: 1,
                ino: 2 + i,
                token: None,
                extents: vec![written(i, DATA_START + 4 * i, 4)],
                size: Some(i * BS),
                mtime: Timestamp::from_millis(i),
            });
        }
        if i % 5 == 0 {
            ops.push(falloc(
                2 + i,
                0,
                3 * BS,
                FallocMode::ZeroRange { keep_size: false },
            ));
        }
    }
    ops.push(rename(ROOT_INO, "f3", ROOT_INO, "f4", 0));
    ops.push(Op::Tick);
    (0..ops.len() as u64)
        .zip(ops)
        .map(|(i, op)| Command {
            now_ms: 10 * i,
            op,
            origin: None,
        })
        .collect()
}

#[test]
fn same_commands_give_equal_states_and_serialisations() {
    let cmds = scripted_commands();
    let run = || {
        let mut s = VolumeState::new();
        let rs: Vec<Response> = cmds.iter().map(|c| s.apply(c)).collect();
        (s, rs)
    };
    let (a, ra) = run();
    let (b, rb) = run();
    assert_eq!(ra, rb);
    assert_eq!(a, b);
    assert!(ra.iter().all(|r| !matches!(r, Response::Err(_))), "{ra:?}");
    assert_eq!(ra.last(), Some(&Response::Expired(vec![1])));
    a.check_invariants().unwrap();
    let pa = postcard::to_allocvec(&a).unwrap();
    assert_eq!(pa, postcard::to_allocvec(&b).unwrap());
    let ja = serde_json::to_string(&a).unwrap();
    assert_eq!(ja, serde_json::to_string(&b).unwrap());
    let back: VolumeState = postcard::from_bytes(&pa).unwrap();
    assert_eq!(back, a);
    let back: VolumeState = serde_json::from_str(&ja).unwrap();
    assert_eq!(back, a);
}

#[test]
fn big_namespace_and_fragmented_file_stay_fast() {
    let mut s = VolumeState::new();
    let mut now = 0;
    let mut apply = |s: &mut VolumeState, op| {
        now += 1;
        s.apply(&Command {
            now_ms: now,
            op,
            origin: None,
        })
    };
    apply(
        &mut s,
        Op::InitVolume {
            info: VolumeInfo {
                total_blocks: 1 << 20,
                ..vol_info("big")
            },
        },
    );
    let t = std::time::Instant::now();
    for i in 0..100_000u32 {
        let r = apply(
            &mut s,
            create_op(ROOT_INO, &format!("n{i:06}"), FileKind::File),
        );
        assert!(matches!(r, Response::Attr(_)));
    }
    let build_ns = t.elapsed();
    let sess = match apply(
        &mut s,
        Op::OpenSession {
            node: 1,
            ttl_ms: 1 << 40,
        },
    ) {
        Response::Session(x) => x,
        r => panic!("{r:?}"),
    };
    let f = s.lookup(ROOT_INO, "n000000").unwrap().ino;
    let res = match apply(
        &mut s,
        Op::Reserve {
            session: sess,
            blocks: 30_000,
        },
    ) {
        Response::Reserved(r) => r[0],
        r => panic!("{r:?}"),
    };
    // 10k single-block extents, every other LUN block (no merging).
    let t = std::time::Instant::now();
    for i in 0..10_000u64 {
        let r = apply(
            &mut s,
            commit(sess, f, vec![written(i, res.start + 2 * i, 1)], None),
        );
        assert!(matches!(r, Response::AttrFreed(..)));
    }
    let commits = t.elapsed();
    let t = std::time::Instant::now();
    for i in 0..10_000u64 {
        assert_eq!(s.extents(f, i, 1).unwrap().len(), 1);
        assert!(s.lookup(ROOT_INO, &format!("n{:06}", i * 7)).is_ok());
    }
    let reads = t.elapsed();
    assert_eq!(s.getattr(f).unwrap().blocks, 10_000);
    eprintln!(
        "100k creates {build_ns:?}, 10k commits on a growing 10k-extent file {commits:?}, 10k extents+lookups {reads:?}"
    );
    // Generous bounds (debug build, shared machine): a full scan per call would be
    // orders of magnitude slower.
    assert!(commits < std::time::Duration::from_secs(5), "{commits:?}");
    assert!(reads < std::time::Duration::from_secs(5), "{reads:?}");
    s.check_invariants().unwrap();
}

#[test]
fn a_retried_write_with_the_same_origin_is_applied_once() {
    use crate::types::Origin;
    let mut h = H::new();
    let o = |serial, incarnation, answered_below| {
        Some(Origin {
            node: 7,
            incarnation,
            serial,
            answered_below,
        })
    };
    let mut apply = |origin| {
        h.s.apply(&Command {
            now_ms: 5_000,
            op: create_op(ROOT_INO, "once", FileKind::File),
            origin,
        })
    };
    let first = apply(o(1, 42, 1));
    assert!(matches!(first, Response::Attr(_)), "{first:?}");
    // The retry (same process, same serial) gets the first answer, not EEXIST.
    assert_eq!(apply(o(1, 42, 1)), first);
    // Another serial really runs again.
    assert_eq!(apply(o(2, 42, 1)), Response::Err(MetaError::Exists));
    // Once serial 1 is answered, it is forgotten: a (buggy) replay is applied anew.
    assert_eq!(apply(o(3, 42, 3)), Response::Err(MetaError::Exists));
    assert_eq!(apply(o(1, 42, 3)), Response::Err(MetaError::Exists));
    // A new process of the node starts a new window.
    assert_eq!(apply(o(2, 43, 2)), Response::Err(MetaError::Exists));
    h.s.check_invariants().unwrap();
}
