//! The `fuse` workload: file operations on the FUSE mounts of several nodes, with
//! self-describing block writes verified from another node.
//!
//! Each worker has a writer node and a verifier node (the next one) and repeats a cycle:
//! create `NAME.tmp` on the writer's mount, write a few [`block`](super::super::block)s
//! (each carrying its op id and crc32c), `fsync`, close, rename it to `NAME`, read every
//! written block through the verifier's mount; half the time overwrite some blocks from
//! the verifier's mount (fsync, close) and read them back through the writer's; then unlink
//! its oldest file once it keeps more than [`LIVE_FILES`]. A file's block registers are
//! named by its final name (the history's `target`); each open is its own `conn`, so an
//! `fsync` makes durable exactly the writes made through that open.
//!
//! System calls run on the blocking pool with a deadline ([`FS_TIMEOUT`]): a call on a
//! paused node's mount that misses it is recorded as indeterminate and left to finish
//! on its own. After healing, [`FuseWorkload::verify`] reads back every block of the
//! files still present.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{Workload, WorkloadEnv, WorkloadError};
use crate::chaos::block::{self, BLOCK};
use crate::chaos::history::{OpKind, OpRecord, Outcome};
use crate::chaos::schedule::SplitMix64;

/// Blocks a file may have.
const FILE_BLOCKS: u64 = 8;
/// Files a worker keeps before it unlinks its oldest.
const LIVE_FILES: usize = 3;
const MAX_WORKERS: usize = 6;
const FS_TIMEOUT: Duration = Duration::from_secs(15);

/// A file of the workload that may still exist.
#[derive(Debug, Clone)]
struct LiveFile {
    /// Its target label (the final name, relative to the mount).
    label: String,
    /// The names it may have (the final one first; the temporary one if a rename did not
    /// certainly happen).
    names: Vec<String>,
    blocks: BTreeSet<u64>,
    worker: u32,
}

/// File operations on the FUSE mounts.
#[derive(Debug, Default)]
pub struct FuseWorkload {
    dir: String,
    live: Mutex<Vec<LiveFile>>,
}

#[derive(Debug)]
enum FsError {
    Io(io::Error),
    /// No answer within [`FS_TIMEOUT`] (the call may still complete).
    Timeout,
}

impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsError::Io(e) => write!(f, "{e}"),
            FsError::Timeout => write!(f, "no answer within {FS_TIMEOUT:?}"),
        }
    }
}

impl FsError {
    fn errno(&self) -> Option<i32> {
        match self {
            FsError::Io(e) => e.raw_os_error(),
            FsError::Timeout => None,
        }
    }
}

/// Runs a system call on the blocking pool, giving up waiting after [`FS_TIMEOUT`].
async fn sys<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, FsError> {
    match tokio::time::timeout(FS_TIMEOUT, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r.map_err(FsError::Io),
        Ok(Err(e)) => Err(FsError::Io(io::Error::other(e))),
        Err(_) => Err(FsError::Timeout),
    }
}

/// Outcome of a namespace change or a write that failed with `e`: failed only when the
/// error says nothing was done (the name was missing or taken).
fn change_outcome(e: &FsError) -> Outcome {
    match e.errno() {
        Some(libc::ENOENT) | Some(libc::EEXIST) => Outcome::Failed,
        _ => Outcome::Indeterminate,
    }
}

/// Outcome of a call that changes nothing (read, fsync).
fn query_outcome(e: &FsError) -> Outcome {
    match e {
        FsError::Timeout => Outcome::Indeterminate,
        FsError::Io(_) => Outcome::Failed,
    }
}

/// Closes `file` on the blocking pool: closing a file on a FUSE mount waits for the node
/// (a `FLUSH`), which must never block a runtime thread. A clone still held by a call that
/// missed its deadline closes it when that call ends.
async fn close(file: Arc<File>) {
    let _ = sys(move || {
        drop(file);
        Ok(())
    })
    .await;
}

/// Reads up to one block at block `b` (short at the end of the file).
fn read_block(f: &File, b: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; BLOCK];
    let mut n = 0;
    while n < BLOCK {
        let got = f.read_at(&mut buf[n..], b * BLOCK as u64 + n as u64)?;
        if got == 0 {
            break;
        }
        n += got;
    }
    buf.truncate(n);
    Ok(buf)
}

struct Worker {
    id: u32,
    env: Arc<WorkloadEnv>,
    rng: SplitMix64,
    dir: String,
    writer: (u64, PathBuf),
    verifier: (u64, PathBuf),
    /// Opens so far (each open is a `conn`).
    opens: u64,
}

impl Worker {
    fn record(
        &self,
        id: u64,
        node: u64,
        kind: OpKind,
        invoke_s: f64,
        outcome: Outcome,
        detail: String,
    ) {
        let r = &self.env.recorder;
        r.op(OpRecord {
            id,
            workload: "fuse".into(),
            worker: self.id,
            node,
            kind,
            invoke_s,
            return_s: r.now(),
            outcome,
            detail,
        });
    }

    /// Records a namespace change of `label` with the result of `f`.
    async fn change(
        &self,
        node: u64,
        action: &str,
        label: &str,
        f: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> Outcome {
        let id = self.env.recorder.next_id();
        let invoke_s = self.env.recorder.now();
        let (outcome, detail) = match sys(f).await {
            Ok(()) => (Outcome::Ok, String::new()),
            Err(e) => (change_outcome(&e), e.to_string()),
        };
        let kind = OpKind::Namespace {
            action: action.into(),
            name: label.into(),
        };
        self.record(id, node, kind, invoke_s, outcome, detail);
        outcome
    }

    /// Writes `blocks` of `label` through `file` (a fresh open on `node`, hence a new
    /// `conn`) until one fails, then fsyncs; the blocks it wrote to (whatever the outcome)
    /// are added to `written`, for the read-back.
    async fn write_blocks(
        &mut self,
        node: u64,
        file: Arc<File>,
        label: &str,
        blocks: &[u64],
        written: &mut BTreeSet<u64>,
    ) {
        self.opens += 1;
        let conn = self.opens;
        for &b in blocks {
            let id = self.env.recorder.next_id();
            let (data, crc) = block::encode(id, b);
            let f = file.clone();
            let invoke_s = self.env.recorder.now();
            let res = sys(move || f.write_all_at(&data, b * BLOCK as u64)).await;
            // A failed pwrite may have written part of the block.
            let (outcome, detail) = match &res {
                Ok(()) => (Outcome::Ok, String::new()),
                Err(e) => (Outcome::Indeterminate, e.to_string()),
            };
            written.insert(b);
            let kind = OpKind::BlockWrite {
                target: label.into(),
                block: b,
                op_id: id,
                crc,
                fua: false,
                conn,
            };
            self.record(id, node, kind, invoke_s, outcome, detail);
            if res.is_err() {
                close(file).await;
                return;
            }
        }
        let id = self.env.recorder.next_id();
        let invoke_s = self.env.recorder.now();
        let f = file.clone();
        let (outcome, detail) = match sys(move || f.sync_all()).await {
            Ok(()) => (Outcome::Ok, String::new()),
            Err(e) => (query_outcome(&e), e.to_string()),
        };
        let kind = OpKind::Flush {
            target: label.into(),
            conn,
        };
        self.record(id, node, kind, invoke_s, outcome, detail);
        close(file).await;
    }

    /// Opens `path` for writing (creating it exclusively with `create`).
    async fn open(path: PathBuf, create: bool) -> Result<Arc<File>, FsError> {
        sys(move || {
            let mut o = OpenOptions::new();
            o.write(true).read(true);
            if create {
                o.create_new(true).mode(0o644);
            }
            o.open(path).map(Arc::new)
        })
        .await
    }

    /// Reads `blocks` of `file` through `names` on the mount of `node`.
    async fn verify_blocks(
        &self,
        node: u64,
        mount: &std::path::Path,
        file: &LiveFile,
        final_check: bool,
    ) -> bool {
        let paths: Vec<PathBuf> = file.names.iter().map(|n| mount.join(n)).collect();
        let opened = sys(move || {
            let mut last = io::Error::from_raw_os_error(libc::ENOENT);
            for p in paths {
                match File::open(p) {
                    Ok(f) => return Ok(Arc::new(f)),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
        .await;
        let mut all_ok = true;
        for &b in &file.blocks {
            let id = self.env.recorder.next_id();
            let invoke_s = self.env.recorder.now();
            let res = match &opened {
                Ok(f) => {
                    let f = f.clone();
                    sys(move || read_block(&f, b)).await
                }
                Err(e) => Err(FsError::Io(match e {
                    FsError::Io(e) => io::Error::new(e.kind(), format!("open: {e}")),
                    FsError::Timeout => io::Error::other("open timed out"),
                })),
            };
            let (outcome, d, detail) = match &res {
                Ok(data) => (Outcome::Ok, block::decode(data), String::new()),
                Err(e) => (query_outcome(e), block::decode(&[]), e.to_string()),
            };
            all_ok &= outcome == Outcome::Ok;
            let kind = OpKind::BlockRead {
                target: file.label.clone(),
                block: b,
                observed: d.observed,
                crc_ok: d.crc_ok,
                final_check,
            };
            self.record(id, node, kind, invoke_s, outcome, detail);
        }
        if let Ok(f) = opened {
            close(f).await;
        }
        all_ok
    }

    fn pick_blocks(&mut self, max: u64) -> Vec<u64> {
        let n = 1 + self.rng.below(max);
        let mut v: Vec<u64> = (0..FILE_BLOCKS).collect();
        for i in 0..v.len() {
            let j = i + self.rng.below((v.len() - i) as u64) as usize;
            v.swap(i, j);
        }
        v.truncate(n as usize);
        v
    }

    async fn cycle(&mut self, seq: u64, live: &Mutex<Vec<LiveFile>>) {
        let label = format!("{}/w{}-{seq}", self.dir, self.id);
        let tmp = format!("{label}.tmp");
        let (wn, wm) = self.writer.clone();
        let (vn, vm) = self.verifier.clone();

        // Create and write on the writer's mount.
        let id = self.env.recorder.next_id();
        let invoke_s = self.env.recorder.now();
        let created = Self::open(wm.join(&tmp), true).await;
        let (outcome, detail) = match &created {
            Ok(_) => (Outcome::Ok, String::new()),
            Err(e) => (change_outcome(e), e.to_string()),
        };
        let kind = OpKind::Namespace {
            action: "create".into(),
            name: label.clone(),
        };
        self.record(id, wn, kind, invoke_s, outcome, detail);
        let Ok(file) = created else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        };
        let mut f = LiveFile {
            label: label.clone(),
            names: vec![tmp.clone()],
            blocks: BTreeSet::new(),
            worker: self.id,
        };
        let blocks = self.pick_blocks(6);
        let mut written = BTreeSet::new();
        self.write_blocks(wn, file, &label, &blocks, &mut written)
            .await;
        f.blocks = written;

        // Rename into place.
        let (from, to) = (wm.join(&tmp), wm.join(&label));
        f.names = match self
            .change(wn, "rename", &label, move || std::fs::rename(from, to))
            .await
        {
            Outcome::Ok => vec![label.clone()],
            Outcome::Failed => vec![tmp],
            Outcome::Indeterminate => vec![label.clone(), tmp],
        };
        live.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(f.clone());

        // Verify from the other node; sometimes overwrite from there and verify here.
        self.verify_blocks(vn, &vm, &f, false).await;
        if self.rng.below(2) == 0 {
            let path = vm.join(&f.names[0]);
            if let Ok(file) = Self::open(path, false).await {
                let blocks = self.pick_blocks(3);
                let mut written = BTreeSet::new();
                self.write_blocks(vn, file, &label, &blocks, &mut written)
                    .await;
                f.blocks.extend(written);
                let mut g = live.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(x) = g.iter_mut().find(|x| x.label == f.label) {
                    x.blocks = f.blocks.clone();
                }
            }
            self.verify_blocks(wn, &wm, &f, false).await;
        }

        // Keep a few files: unlink the oldest through a random node's mount.
        let oldest = {
            let g = live.lock().unwrap_or_else(|p| p.into_inner());
            let mine: Vec<&LiveFile> = g.iter().filter(|x| x.worker == self.id).collect();
            (mine.len() > LIVE_FILES).then(|| mine[0].clone())
        };
        if let Some(old) = oldest {
            let (un, um) =
                self.env.mounts[self.rng.below(self.env.mounts.len() as u64) as usize].clone();
            let paths: Vec<PathBuf> = old.names.iter().map(|n| um.join(n)).collect();
            let outcome = self
                .change(un, "unlink", &old.label, move || {
                    let mut last = io::Error::from_raw_os_error(libc::ENOENT);
                    for p in paths {
                        match std::fs::remove_file(p) {
                            Ok(()) => return Ok(()),
                            Err(e) => last = e,
                        }
                    }
                    Err(last)
                })
                .await;
            if outcome != Outcome::Failed {
                live.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|x| x.label != old.label);
            }
        }
    }
}

impl Workload for FuseWorkload {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn setup<'a>(&'a mut self, env: &'a WorkloadEnv) -> BoxFuture<'a, Result<(), WorkloadError>> {
        Box::pin(async move {
            let err = |why: String| WorkloadError::Setup {
                workload: "fuse",
                why,
            };
            let mount = env.first_mount("fuse")?;
            self.dir = format!("chaos-fuse-{}-{:08x}", env.seed, rand::random::<u32>());
            let dir = mount.join(&self.dir);
            sys(move || std::fs::create_dir(dir))
                .await
                .map_err(|e| err(format!("cannot create the run directory: {e}")))
        })
    }

    fn run(
        self: Arc<Self>,
        env: Arc<WorkloadEnv>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Result<(), WorkloadError>> {
        Box::pin(async move {
            let n = env.mounts.len();
            let tasks: Vec<_> = (0..n.min(MAX_WORKERS))
                .map(|i| {
                    let mut w = Worker {
                        id: i as u32,
                        env: env.clone(),
                        rng: SplitMix64::new(env.seed ^ (0xf05e + i as u64)),
                        dir: self.dir.clone(),
                        writer: env.mounts[i % n].clone(),
                        verifier: env.mounts[(i + 1) % n].clone(),
                        opens: 0,
                    };
                    let (me, stop) = (self.clone(), stop.clone());
                    tokio::spawn(async move {
                        let mut seq = 0;
                        while !stop.is_cancelled() {
                            seq += 1;
                            w.cycle(seq, &me.live).await;
                        }
                    })
                })
                .collect();
            let mut panicked = false;
            for t in tasks {
                panicked |= t.await.is_err();
            }
            if panicked {
                return Err(WorkloadError::Panicked { workload: "fuse" });
            }
            Ok(())
        })
    }

    fn verify<'a>(&'a self, env: &'a Arc<WorkloadEnv>) -> BoxFuture<'a, Result<(), WorkloadError>> {
        Box::pin(async move {
            let files = self.live.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for f in files {
                let w = Worker {
                    id: 1000 + f.worker,
                    env: env.clone(),
                    rng: SplitMix64::new(0),
                    dir: self.dir.clone(),
                    writer: env.mounts[0].clone(),
                    verifier: env.mounts[0].clone(),
                    opens: 0,
                };
                // The first node whose mount reads the whole file.
                for (node, mount) in &env.mounts {
                    if w.verify_blocks(*node, mount, &f, true).await {
                        break;
                    }
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_or_taken_name_means_nothing_happened() {
        let e = |n| FsError::Io(io::Error::from_raw_os_error(n));
        assert_eq!(change_outcome(&e(libc::ENOENT)), Outcome::Failed);
        assert_eq!(change_outcome(&e(libc::EEXIST)), Outcome::Failed);
        assert_eq!(change_outcome(&e(libc::EIO)), Outcome::Indeterminate);
        assert_eq!(change_outcome(&e(libc::ENOTCONN)), Outcome::Indeterminate);
        assert_eq!(change_outcome(&FsError::Timeout), Outcome::Indeterminate);
        assert_eq!(query_outcome(&e(libc::EIO)), Outcome::Failed);
    }
}
