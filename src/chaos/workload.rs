//! Workloads: clients that drive a cluster through its real interfaces while faults are
//! injected, recording every operation in the history.
//!
//! A [`Workload`] prepares (before any fault), runs until told to stop, and verifies
//! after healing (e.g. a read-back of every written block):
//! - `meta` (here): metadata operations with lock contention and fenced writes;
//! - [`nbd`]: self-describing block writes, flushes and reads through NBD connections to
//!   the nodes' exports, following each export's write owner;
//! - [`fuse`]: file operations on several nodes' mounts, with self-describing writes
//!   verified from another node.
//!
//! Invariant: an operation is recorded as `ok` or `failed` only when the answer says so
//! for certain; anything else (timeouts, connections lost after sending, "may or may
//! not have been applied") is `indeterminate`.

pub mod fuse;
pub mod nbd;
pub mod nbd_client;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use csv_core::meta::{BlockRange, Extent, ExtentState, FileKind, ROOT_INO, Timestamp};
use csv_core::op::{Op, Response};
use futures::future::BoxFuture;
use lockmgr::rpc::auth::ClusterKey;
use lockmgr::rpc::message::{LeaderError, Reply, Request};
use lockmgr::rpc::{RpcClient, RpcError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::history::{OpKind, OpRecord, Outcome, Recorder};
use super::schedule::SplitMix64;
use crate::client::OPERATOR_ID;

/// The workloads the harness knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum WorkloadKind {
    /// Metadata operations with lock contention across nodes.
    Meta,
    /// Block writes and reads through NBD clients.
    Nbd,
    /// File operations on the FUSE mounts.
    Fuse,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 3] = [WorkloadKind::Meta, WorkloadKind::Nbd, WorkloadKind::Fuse];

    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Meta => "meta",
            WorkloadKind::Nbd => "nbd",
            WorkloadKind::Fuse => "fuse",
        }
    }

    /// Parses a comma-separated list such as `meta,nbd`.
    pub fn parse_list(s: &str) -> Result<Vec<WorkloadKind>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let k = WorkloadKind::ALL
                .into_iter()
                .find(|k| k.name() == part)
                .ok_or_else(|| format!("unknown workload {part:?} (known: meta, nbd, fuse)"))?;
            if !out.contains(&k) {
                out.push(k);
            }
        }
        if out.is_empty() {
            return Err("no workload given".into());
        }
        Ok(out)
    }
}

/// What a workload failed to do (the harness stops the run: the history would not mean
/// what the checkers assume).
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("workload {kind} is not available in this build yet: {needs}")]
    Unavailable {
        kind: &'static str,
        needs: &'static str,
    },
    #[error("workload {workload} could not prepare: {why}")]
    Setup { workload: &'static str, why: String },
    #[error("a worker of workload {workload} panicked")]
    Panicked { workload: &'static str },
}

/// What every workload gets: the nodes and their endpoints, the key, the recorder, the
/// seed.
pub struct WorkloadEnv {
    /// (node id, RPC address).
    pub nodes: Vec<(u64, String)>,
    /// (node id, NBD address `host:port`).
    pub nbd: Vec<(u64, String)>,
    /// (node id, FUSE mount point).
    pub mounts: Vec<(u64, PathBuf)>,
    /// The operator's client of the whole cluster.
    pub client: crate::client::CtlClient,
    pub key: ClusterKey,
    pub recorder: Arc<Recorder>,
    pub seed: u64,
}

impl WorkloadEnv {
    /// The first node's mount, where a workload creates its files.
    pub fn first_mount(&self, workload: &'static str) -> Result<PathBuf, WorkloadError> {
        self.mounts
            .first()
            .map(|(_, m)| m.clone())
            .ok_or_else(|| WorkloadError::Setup {
                workload,
                why: "no nodes".into(),
            })
    }
}

/// A client of the cluster that records its operations.
pub trait Workload: Send + Sync {
    fn name(&self) -> &'static str;

    /// Prepares, before any fault is injected.
    fn setup<'a>(&'a mut self, env: &'a WorkloadEnv) -> BoxFuture<'a, Result<(), WorkloadError>>;

    /// Runs until `stop` fires; returns once every worker finished its last operation.
    fn run(
        self: Arc<Self>,
        env: Arc<WorkloadEnv>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Result<(), WorkloadError>>;

    /// After healing and convergence: final reads and clean-up, recorded too.
    fn verify<'a>(&'a self, env: &'a Arc<WorkloadEnv>) -> BoxFuture<'a, Result<(), WorkloadError>>;
}

/// The workload for `kind` (every kind is available in this build; new kinds that need
/// layers still in progress are refused here with [`WorkloadError::Unavailable`]).
pub fn build(kind: WorkloadKind) -> Result<Box<dyn Workload>, WorkloadError> {
    Ok(match kind {
        WorkloadKind::Meta => Box::new(MetaWorkload::default()),
        WorkloadKind::Nbd => Box::new(nbd::NbdWorkload::default()),
        WorkloadKind::Fuse => Box::new(fuse::FuseWorkload::default()),
    })
}

// ---- calling a node ------------------------------------------------------------------------

/// How long a worker waits for one answer (beyond the node's own 15 s write deadline, so
/// the node decides before the client gives up).
const OP_TIMEOUT: Duration = Duration::from_secs(20);

/// Phrases of node errors after which the change may have been applied.
const MAYBE_APPLIED: [&str; 4] = [
    "may or may not",
    "metadata RPC failed",
    "Raft failed",
    "state machine closed",
];

fn classify_error(e: &str) -> Outcome {
    if MAYBE_APPLIED.iter().any(|m| e.contains(m)) {
        Outcome::Indeterminate
    } else {
        Outcome::Failed
    }
}

/// The outcome of one call and what it answered.
struct Answer {
    outcome: Outcome,
    reply: Option<Reply>,
    detail: String,
}

async fn call(client: &RpcClient, req: Request) -> Answer {
    match client.call(req, OP_TIMEOUT).await {
        Ok(reply) => {
            let (outcome, detail) = match &reply {
                Reply::Lock(Ok(_)) => (Outcome::Ok, String::new()),
                Reply::Lock(Err(e)) => (classify_error(e), e.clone()),
                Reply::Write(Ok(Response::Err(e))) => (Outcome::Failed, e.to_string()),
                Reply::Write(Ok(_)) => (Outcome::Ok, String::new()),
                Reply::Write(Err(LeaderError::NotLeader { .. })) => {
                    (Outcome::Failed, "not the leader".into())
                }
                Reply::Write(Err(LeaderError::Unavailable(e))) => (classify_error(e), e.clone()),
                Reply::Refused(e) => (Outcome::Failed, e.clone()),
                other => (
                    Outcome::Indeterminate,
                    format!("unexpected reply {other:?}"),
                ),
            };
            Answer {
                outcome,
                reply: Some(reply),
                detail,
            }
        }
        // Never sent: certainly not applied.
        Err(e @ RpcError::Connect { .. }) => Answer {
            outcome: Outcome::Failed,
            reply: None,
            detail: e.to_string(),
        },
        Err(e) => Answer {
            outcome: Outcome::Indeterminate,
            reply: None,
            detail: e.to_string(),
        },
    }
}

/// One worker's link to its node and the recorder.
struct Worker {
    workload: &'static str,
    id: u32,
    node: u64,
    client: RpcClient,
    recorder: Arc<Recorder>,
}

impl Worker {
    fn new(env: &WorkloadEnv, workload: &'static str, id: u32, node: &(u64, String)) -> Self {
        Worker {
            workload,
            id,
            node: node.0,
            client: RpcClient::new(node.1.clone(), env.key.clone(), OPERATOR_ID),
            recorder: env.recorder.clone(),
        }
    }

    /// Sends `req`, records it as `kind` (adjusted by `finish` once the answer is known).
    async fn op(
        &self,
        req: Request,
        mut kind: OpKind,
        finish: impl FnOnce(&mut OpKind, &Reply),
    ) -> (Outcome, Option<Reply>) {
        let id = self.recorder.next_id();
        let invoke_s = self.recorder.now();
        let a = call(&self.client, req).await;
        if let (Outcome::Ok, Some(r)) = (a.outcome, &a.reply) {
            finish(&mut kind, r);
        }
        self.recorder.op(OpRecord {
            id,
            workload: self.workload.into(),
            worker: self.id,
            node: self.node,
            kind,
            invoke_s,
            return_s: self.recorder.now(),
            outcome: a.outcome,
            detail: a.detail,
        });
        (a.outcome, a.reply)
    }

    /// This worker's node's live session, read from the node itself.
    async fn session(&self) -> Option<u64> {
        match self
            .client
            .call(Request::Status, Duration::from_secs(2))
            .await
        {
            Ok(Reply::Status(s)) => s.session,
            _ => None,
        }
    }
}

async fn submit_setup(client: &RpcClient, op: Op) -> Result<Response, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let a = call(client, Request::Submit(op.clone())).await;
        match (a.outcome, a.reply) {
            (Outcome::Ok, Some(Reply::Write(Ok(r)))) => return Ok(r),
            _ if tokio::time::Instant::now() > deadline => return Err(a.detail),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

// ---- meta ------------------------------------------------------------------------------------

/// Files whose data locks the lock workers contend for.
const CONTENDED_FILES: usize = 3;
/// File blocks the fenced writes cycle over (bounds the space used).
const WRITE_BLOCKS: u64 = 4;

/// Metadata operations with lock contention across nodes.
///
/// - One lock worker per node. All contend for the data locks (`data:{ino}`) of a few
///   shared files: acquire exclusively through the node's session; while holding, make a
///   fenced write (reserve a block, commit it to the file with the token), validate the
///   token, release. Locks belong to node sessions, so one lock worker per node keeps
///   "holder" and "worker" the same thing.
/// - One namespace worker per node: create, rename and unlink its own names in a shared
///   directory (concurrent changes to one directory from every node).
#[derive(Debug, Default)]
pub struct MetaWorkload {
    dir: u64,
    files: Vec<u64>,
    block_size: u64,
}

impl MetaWorkload {
    async fn lock_worker(self: Arc<Self>, w: Worker, seed: u64, stop: CancellationToken) {
        let mut rng = SplitMix64::new(seed ^ (0x10c0 + w.id as u64));
        while !stop.is_cancelled() {
            let ino = self.files[rng.below(self.files.len() as u64) as usize];
            let key = csv_core::meta::data_lock_key(ino);
            let (outcome, reply) = w
                .op(
                    Request::LockAcquire {
                        key: key.clone(),
                        exclusive: true,
                    },
                    OpKind::LockAcquire {
                        key: key.clone(),
                        token: None,
                    },
                    |k, r| {
                        if let (OpKind::LockAcquire { token, .. }, Reply::Lock(Ok(t))) = (k, r) {
                            *token = Some(*t);
                        }
                    },
                )
                .await;
            match (outcome, reply) {
                (Outcome::Ok, Some(Reply::Lock(Ok(token)))) => {
                    self.hold(&w, &mut rng, ino, &key, token).await;
                }
                (Outcome::Indeterminate, _) => {
                    // We may hold it: let go so that others are not blocked until expiry.
                    w.op(
                        Request::LockRelease { key: key.clone() },
                        OpKind::LockRelease { key, token: None },
                        |_, _| {},
                    )
                    .await;
                }
                (_, None) => {
                    // The node is down: do not spin.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => tokio::time::sleep(Duration::from_millis(5 + rng.below(30))).await,
            }
        }
    }

    /// While holding `key` with `token`: a fenced write, a short pause, a validation, and
    /// the release.
    async fn hold(&self, w: &Worker, rng: &mut SplitMix64, ino: u64, key: &str, token: u64) {
        if let Some(session) = w.session().await {
            let (outcome, reply) = w
                .op(
                    Request::Submit(Op::Reserve { session, blocks: 1 }),
                    OpKind::Reserve { blocks: 1 },
                    |_, _| {},
                )
                .await;
            if let (Outcome::Ok, Some(Reply::Write(Ok(Response::Reserved(ranges))))) =
                (outcome, reply)
                && let Some(r) = ranges.first().copied()
            {
                self.fenced_write(w, rng, session, ino, token, r, ranges)
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(5 + rng.below(25))).await;
        w.op(
            Request::LockValidate {
                key: key.into(),
                token,
            },
            OpKind::LockValidate {
                key: key.into(),
                token,
            },
            |_, _| {},
        )
        .await;
        w.op(
            Request::LockRelease { key: key.into() },
            OpKind::LockRelease {
                key: key.into(),
                token: Some(token),
            },
            |_, _| {},
        )
        .await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn fenced_write(
        &self,
        w: &Worker,
        rng: &mut SplitMix64,
        session: u64,
        ino: u64,
        token: u64,
        r: BlockRange,
        ranges: Vec<BlockRange>,
    ) {
        let file_block = rng.below(WRITE_BLOCKS);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let op = Op::CommitWrite {
            session,
            ino,
            token: Some(token),
            extents: vec![Extent {
                file_block,
                lun_block: r.start,
                len: 1,
                state: ExtentState::Written,
            }],
            size: Some((file_block + 1) * self.block_size),
            mtime: Timestamp::from_millis(now),
        };
        let (outcome, _) = w
            .op(
                Request::Submit(op),
                OpKind::FencedWrite {
                    ino,
                    token,
                    file_block,
                },
                |_, _| {},
            )
            .await;
        if outcome == Outcome::Failed {
            // The block stayed reserved: give it back (best effort, recorded).
            let blocks = ranges.iter().map(|r| r.len).sum();
            w.op(
                Request::Submit(Op::Unreserve { session, ranges }),
                OpKind::Unreserve { blocks },
                |_, _| {},
            )
            .await;
        }
    }

    async fn namespace_worker(self: Arc<Self>, w: Worker, stop: CancellationToken) {
        let mut i = 0u64;
        while !stop.is_cancelled() {
            let name = format!("n{}-{i}", w.node);
            let renamed = format!("{name}.r");
            i += 1;
            let create = Op::Create {
                parent: self.dir,
                name: name.clone(),
                kind: FileKind::File,
                perm: 0o644,
                uid: 0,
                gid: 0,
                rdev: 0,
                symlink: None,
            };
            let rename = Op::Rename {
                parent: self.dir,
                name: name.clone(),
                new_parent: self.dir,
                new_name: renamed.clone(),
                flags: 0,
            };
            let unlink = Op::Unlink {
                parent: self.dir,
                name: renamed.clone(),
            };
            let mut down = false;
            for (action, op, n) in [
                ("create", create, &name),
                ("rename", rename, &name),
                ("unlink", unlink, &renamed),
            ] {
                let (_, reply) = w
                    .op(
                        Request::Submit(op),
                        OpKind::Namespace {
                            action: action.into(),
                            name: n.clone(),
                        },
                        |_, _| {},
                    )
                    .await;
                down |= reply.is_none();
            }
            if down {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

impl Workload for MetaWorkload {
    fn name(&self) -> &'static str {
        "meta"
    }

    fn setup<'a>(&'a mut self, env: &'a WorkloadEnv) -> BoxFuture<'a, Result<(), WorkloadError>> {
        Box::pin(async move {
            let err = |why: String| WorkloadError::Setup {
                workload: "meta",
                why,
            };
            let first = env.nodes.first().ok_or_else(|| err("no nodes".into()))?;
            let client = RpcClient::new(first.1.clone(), env.key.clone(), OPERATOR_ID);
            let vol = match client
                .call(
                    Request::Query(lockmgr::rpc::message::Query::Volume),
                    Duration::from_secs(10),
                )
                .await
            {
                Ok(Reply::Query(Ok(lockmgr::rpc::message::QueryReply::Volume(Some(v))))) => v,
                other => return Err(err(format!("cannot read the volume: {other:?}"))),
            };
            self.block_size = vol.block_size as u64;
            let create = |parent, name: String, kind| Op::Create {
                parent,
                name,
                kind,
                perm: 0o755,
                uid: 0,
                gid: 0,
                rdev: 0,
                symlink: None,
            };
            let dir_name = format!("chaos-{}-{:08x}", env.seed, rand::random::<u32>());
            self.dir = match submit_setup(&client, create(ROOT_INO, dir_name, FileKind::Dir))
                .await
                .map_err(err)?
            {
                Response::Attr(a) => a.ino,
                other => return Err(err(format!("cannot create the run directory: {other:?}"))),
            };
            for i in 0..CONTENDED_FILES {
                match submit_setup(
                    &client,
                    create(self.dir, format!("shared-{i}"), FileKind::File),
                )
                .await
                .map_err(err)?
                {
                    Response::Attr(a) => self.files.push(a.ino),
                    other => return Err(err(format!("cannot create a shared file: {other:?}"))),
                }
            }
            Ok(())
        })
    }

    fn run(
        self: Arc<Self>,
        env: Arc<WorkloadEnv>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Result<(), WorkloadError>> {
        Box::pin(async move {
            let mut tasks = Vec::new();
            for (i, node) in env.nodes.iter().enumerate() {
                let lw = Worker::new(&env, "meta", 2 * i as u32, node);
                tasks.push(tokio::spawn(self.clone().lock_worker(
                    lw,
                    env.seed,
                    stop.clone(),
                )));
                let nw = Worker::new(&env, "meta", 2 * i as u32 + 1, node);
                tasks.push(tokio::spawn(
                    self.clone().namespace_worker(nw, stop.clone()),
                ));
            }
            let mut panicked = false;
            for t in tasks {
                panicked |= t.await.is_err();
            }
            if panicked {
                return Err(WorkloadError::Panicked { workload: "meta" });
            }
            Ok(())
        })
    }

    fn verify<'a>(
        &'a self,
        _env: &'a Arc<WorkloadEnv>,
    ) -> BoxFuture<'a, Result<(), WorkloadError>> {
        // Its state is checked by the fsck and replica checkers; nothing to read back.
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_errors_that_may_have_applied_are_indeterminate() {
        assert_eq!(
            classify_error("the metadata write may or may not have been applied: timeout"),
            Outcome::Indeterminate
        );
        assert_eq!(
            classify_error("metadata RPC failed"),
            Outcome::Indeterminate
        );
        assert_eq!(
            classify_error("lock data:5 is held by another session"),
            Outcome::Failed
        );
        assert_eq!(
            classify_error("this node has no live metadata session"),
            Outcome::Failed
        );
    }

    #[test]
    fn workloads_parse_and_every_kind_builds() {
        assert_eq!(
            WorkloadKind::parse_list("meta,nbd").unwrap(),
            vec![WorkloadKind::Meta, WorkloadKind::Nbd]
        );
        assert!(WorkloadKind::parse_list("").is_err());
        assert!(WorkloadKind::parse_list("meta,disk").is_err());
        for k in WorkloadKind::ALL {
            assert_eq!(build(k).unwrap().name(), k.name());
        }
    }
}
