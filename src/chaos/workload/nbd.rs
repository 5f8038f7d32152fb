//! The `nbd` workload: self-describing block writes, flushes and reads through real NBD
//! connections to the nodes' volume exports, following each export's write owner.
//!
//! Each worker owns one export (`chaos-nbd-…/wK.img`, [`BLOCKS`] blocks) and writes it
//! through one node at a time, as a VM does:
//! - every write is a [`block`](super::super::block) carrying its op id and crc32c, some
//!   with FUA; flushes follow; reads on the same connection and, now and then, through
//!   another node's export (which makes the owner commit and give up its lock) verify;
//! - when its connection's writes are refused with `EPERM` (ownership moved: a `migrate`
//!   fault, or the node lost its session), the refused write is recorded as failed, the
//!   old connection is flushed (the handoff committed what it acknowledged), and the worker
//!   reconnects to the export's new owner;
//! - when its node does not answer for [`SWITCH_AFTER`], it moves to the next node, whose
//!   first write claims the export.
//!
//! A connection never outlives a transport error ([`NbdClient`]), so every write and
//! flush names the connection it went through (`conn`) and the checkers scope flushes
//! exactly. After healing, [`NbdWorkload::verify`] reads every block of every export back.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lockmgr::rpc::message::{Query, QueryReply};
use tokio_util::sync::CancellationToken;

use super::nbd_client::{ClientError, EPERM, NbdClient};
use super::{Workload, WorkloadEnv, WorkloadError};
use crate::chaos::block::{self, BLOCK};
use crate::chaos::history::{OpKind, OpRecord, Outcome};
use crate::chaos::schedule::SplitMix64;

/// Block registers per export.
pub const BLOCKS: u64 = 16;
/// Writers at most (one export each), however many nodes.
const MAX_WORKERS: usize = 6;
/// The directory of a run's exports starts with this (the `migrate` nemesis moves them).
pub const EXPORT_DIR_PREFIX: &str = "chaos-nbd-";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longer than a claim that waits for a dead owner's session to expire.
const OP_TIMEOUT: Duration = Duration::from_secs(15);
/// A node that refuses connections this long is given up for the next one.
const SWITCH_AFTER: f64 = 3.0;
/// How long a worker whose writes were refused waits for the new owner to appear.
const FOLLOW_WAIT: Duration = Duration::from_secs(3);
/// Back-off after a failed operation: doubles from the first value up to the second, and
/// is reset by a success (a node without a lease fails I/O at once; a worker must not spin).
const BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(500));

#[derive(Debug, Clone)]
struct Export {
    name: String,
    ino: u64,
}

/// Block writes and reads through NBD clients.
#[derive(Debug, Default)]
pub struct NbdWorkload {
    exports: Vec<Export>,
}

/// Outcome of a request that changes data.
fn write_outcome(e: &ClientError) -> Outcome {
    match e {
        ClientError::Connect { .. } | ClientError::NotSent(_) => Outcome::Failed,
        // Refused before anything was written: ownership revoked, no space, bad request.
        ClientError::Refused { errno } if [EPERM, 28, 22].contains(errno) => Outcome::Failed,
        // An I/O error may have changed part of the range.
        ClientError::Refused { .. } | ClientError::Unknown(_) => Outcome::Indeterminate,
    }
}

/// Outcome of a request that changes nothing (a read, a flush).
fn read_outcome(e: &ClientError) -> Outcome {
    match e {
        ClientError::Unknown(_) => Outcome::Indeterminate,
        _ => Outcome::Failed,
    }
}

struct Worker {
    id: u32,
    export: Export,
    env: Arc<WorkloadEnv>,
    rng: SplitMix64,
    node: u64,
    conn: Option<NbdClient>,
    /// Id of `conn` (unique in this worker).
    conn_id: u64,
    /// Since when the current node has refused connections.
    down_since: Option<f64>,
    /// Current back-off after failed operations (zero after a success).
    backoff: Duration,
}

impl Worker {
    fn addr(&self, node: u64) -> Option<&str> {
        self.env
            .nbd
            .iter()
            .find(|(n, _)| *n == node)
            .map(|(_, a)| a.as_str())
    }

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
            workload: "nbd".into(),
            worker: self.id,
            node,
            kind,
            invoke_s,
            return_s: r.now(),
            outcome,
            detail,
        });
    }

    /// The next node after the current one (by id order, wrapping).
    fn next_node(&self) -> u64 {
        let ids: Vec<u64> = self.env.nbd.iter().map(|(n, _)| *n).collect();
        let i = ids.iter().position(|n| *n == self.node).unwrap_or(0);
        ids[(i + 1) % ids.len()]
    }

    async fn connect(&mut self) {
        let Some(addr) = self.addr(self.node).map(str::to_owned) else {
            return;
        };
        match NbdClient::connect(&addr, &self.export.name, CONNECT_TIMEOUT, OP_TIMEOUT).await {
            Ok(c) => {
                self.conn = Some(c);
                self.conn_id += 1;
                self.down_since = None;
            }
            Err(e) => {
                let now = self.env.recorder.now();
                let since = *self.down_since.get_or_insert(now);
                tracing::debug!(worker = self.id, node = self.node, error = %e, "nbd workload: connect failed");
                if now - since > SWITCH_AFTER {
                    self.node = self.next_node();
                    self.down_since = None;
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Drops a connection that died (its requests can no longer be answered).
    fn drop_if_dead(&mut self) {
        if self.conn.as_ref().is_some_and(NbdClient::is_dead) {
            self.conn = None;
        }
    }

    async fn write(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let id = self.env.recorder.next_id();
        let b = self.rng.below(BLOCKS);
        let want_fua = self.rng.below(4) == 0;
        let (data, crc) = block::encode(id, b);
        let invoke_s = self.env.recorder.now();
        let res = conn.write(b * BLOCK as u64, &data, want_fua).await;
        let (outcome, fua, detail) = match &res {
            Ok(fua) => (Outcome::Ok, *fua, String::new()),
            Err(e) => (write_outcome(e), want_fua, e.to_string()),
        };
        let kind = OpKind::BlockWrite {
            target: self.export.name.clone(),
            block: b,
            op_id: id,
            crc,
            fua,
            conn: self.conn_id,
        };
        self.record(id, self.node, kind, invoke_s, outcome, detail);
        let ok = res.is_ok();
        match res {
            Err(ClientError::Refused { errno: EPERM }) => self.follow_owner().await,
            Err(ClientError::NotSent(_)) => self.conn = None,
            _ => self.drop_if_dead(),
        }
        ok
    }

    async fn flush(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let id = self.env.recorder.next_id();
        let invoke_s = self.env.recorder.now();
        let res = conn.flush().await;
        let (outcome, detail) = match &res {
            Ok(()) => (Outcome::Ok, String::new()),
            Err(e) => (read_outcome(e), e.to_string()),
        };
        let kind = OpKind::Flush {
            target: self.export.name.clone(),
            conn: self.conn_id,
        };
        self.record(id, self.node, kind, invoke_s, outcome, detail);
        self.drop_if_dead();
        res.is_ok()
    }

    /// Reads block `b` through `conn` and records it (as read on `node`).
    async fn read_on(
        &mut self,
        node: u64,
        conn: &mut NbdClient,
        b: u64,
        final_check: bool,
    ) -> bool {
        let id = self.env.recorder.next_id();
        let invoke_s = self.env.recorder.now();
        let res = conn.read(b * BLOCK as u64, BLOCK as u32).await;
        let (outcome, d, detail) = match &res {
            Ok(data) => (Outcome::Ok, block::decode(data), String::new()),
            Err(e) => (read_outcome(e), block::decode(&[]), format!("{e}")),
        };
        let kind = OpKind::BlockRead {
            target: self.export.name.clone(),
            block: b,
            observed: d.observed,
            crc_ok: d.crc_ok,
            final_check,
        };
        self.record(id, node, kind, invoke_s, outcome, detail);
        res.is_ok()
    }

    async fn read_own(&mut self) -> bool {
        let Some(mut conn) = self.conn.take() else {
            return false;
        };
        let b = self.rng.below(BLOCKS);
        let ok = self.read_on(self.node, &mut conn, b, false).await;
        if !conn.is_dead() {
            self.conn = Some(conn);
        }
        ok
    }

    /// A read through another node's export, on a connection of its own.
    async fn read_elsewhere(&mut self) -> bool {
        let others: Vec<(u64, String)> = self
            .env
            .nbd
            .iter()
            .filter(|(n, _)| *n != self.node)
            .cloned()
            .collect();
        if others.is_empty() {
            return true;
        }
        let (node, addr) = others[self.rng.below(others.len() as u64) as usize].clone();
        let b = self.rng.below(BLOCKS);
        let invoke_s = self.env.recorder.now();
        match NbdClient::connect(&addr, &self.export.name, CONNECT_TIMEOUT, OP_TIMEOUT).await {
            Ok(mut c) => {
                let ok = self.read_on(node, &mut c, b, false).await;
                c.close().await;
                ok
            }
            Err(e) => {
                let kind = OpKind::BlockRead {
                    target: self.export.name.clone(),
                    block: b,
                    observed: 0,
                    crc_ok: true,
                    final_check: false,
                };
                let id = self.env.recorder.next_id();
                self.record(id, node, kind, invoke_s, Outcome::Failed, e.to_string());
                false
            }
        }
    }

    /// The node holding the export's NBD write ownership, if any.
    async fn owner(&self) -> Option<u64> {
        let key = nbd_backend::volume::owner_key(self.export.ino);
        match self.env.client.query(Query::Locks).await {
            Ok(QueryReply::Locks(locks)) => locks
                .into_iter()
                .find(|l| l.key == key)
                .and_then(|l| l.holders.first().map(|h| h.node)),
            _ => None,
        }
    }

    /// After a refused write: flush the old connection (a handoff commits and flushes what
    /// the connection acknowledged, so this flush must succeed for them too), then move to
    /// the export's new owner (or reconnect here, where the next write claims it again).
    async fn follow_owner(&mut self) {
        self.flush().await;
        if let Some(c) = self.conn.take() {
            c.close().await;
        }
        let deadline = tokio::time::Instant::now() + FOLLOW_WAIT;
        let mut owner = None;
        while tokio::time::Instant::now() < deadline {
            owner = self.owner().await;
            if owner.is_some_and(|o| o != self.node) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(o) = owner {
            tracing::debug!(worker = self.id, from = self.node, to = o, export = %self.export.name, "nbd workload: following the export's owner");
            self.node = o;
        }
    }

    async fn run(mut self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            if self.conn.is_none() {
                self.connect().await;
                continue;
            }
            let ok = match self.rng.below(100) {
                0..50 => self.write().await,
                50..65 => self.flush().await,
                65..92 => self.read_own().await,
                _ => self.read_elsewhere().await,
            };
            if ok {
                self.backoff = Duration::ZERO;
            } else {
                self.backoff = (self.backoff * 2).clamp(BACKOFF.0, BACKOFF.1);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(self.backoff) => {}
                }
            }
        }
        if let Some(c) = self.conn.take() {
            c.close().await;
        }
    }
}

impl NbdWorkload {
    /// Reads every block of `export` back through some node, trying each in turn until one
    /// serves it; records the reads as the final check.
    async fn read_back(&self, env: &Arc<WorkloadEnv>, worker: u32, export: &Export) -> bool {
        let mut w = Worker {
            id: worker,
            export: export.clone(),
            env: env.clone(),
            rng: SplitMix64::new(0),
            node: 0,
            conn: None,
            conn_id: 0,
            down_since: None,
            backoff: Duration::ZERO,
        };
        for (node, addr) in env.nbd.clone() {
            let Ok(mut c) =
                NbdClient::connect(&addr, &export.name, CONNECT_TIMEOUT, OP_TIMEOUT).await
            else {
                continue;
            };
            for b in 0..BLOCKS {
                w.read_on(node, &mut c, b, true).await;
            }
            let ok = !c.is_dead();
            c.close().await;
            if ok {
                return true;
            }
        }
        false
    }
}

impl Workload for NbdWorkload {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn setup<'a>(&'a mut self, env: &'a WorkloadEnv) -> BoxFuture<'a, Result<(), WorkloadError>> {
        Box::pin(async move {
            let err = |why: String| WorkloadError::Setup {
                workload: "nbd",
                why,
            };
            let mount = env.first_mount("nbd")?;
            let dir = format!(
                "{EXPORT_DIR_PREFIX}{}-{:08x}",
                env.seed,
                rand::random::<u32>()
            );
            let n = env.nodes.len().min(MAX_WORKERS);
            let names: Vec<String> = (0..n).map(|i| format!("{dir}/w{i}.img")).collect();
            let files = names.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                std::fs::create_dir(mount.join(&dir))?;
                for f in files {
                    std::fs::File::create(mount.join(f))?.set_len(BLOCKS * BLOCK as u64)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| err(format!("creating the exports panicked: {e}")))?
            .map_err(|e| err(format!("cannot create the exports: {e}")))?;
            let ids: Vec<u64> = env.nodes.iter().map(|(n, _)| *n).collect();
            let rows = crate::exports::list(&env.client, &ids)
                .await
                .map_err(|e| err(format!("cannot list the exports: {e:#}")))?;
            for name in names {
                let row = rows
                    .iter()
                    .find(|r| r.name == name)
                    .ok_or_else(|| err(format!("export {name} is not listed")))?;
                self.exports.push(Export { name, ino: row.ino });
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
            let tasks: Vec<_> = self
                .exports
                .iter()
                .enumerate()
                .map(|(i, export)| {
                    let w = Worker {
                        id: i as u32,
                        export: export.clone(),
                        env: env.clone(),
                        rng: SplitMix64::new(env.seed ^ (0x4eb0 + i as u64)),
                        node: env.nbd[i % env.nbd.len()].0,
                        conn: None,
                        conn_id: 0,
                        down_since: None,
                        backoff: Duration::ZERO,
                    };
                    tokio::spawn(w.run(stop.clone()))
                })
                .collect();
            let mut panicked = false;
            for t in tasks {
                panicked |= t.await.is_err();
            }
            if panicked {
                return Err(WorkloadError::Panicked { workload: "nbd" });
            }
            Ok(())
        })
    }

    fn verify<'a>(&'a self, env: &'a Arc<WorkloadEnv>) -> BoxFuture<'a, Result<(), WorkloadError>> {
        Box::pin(async move {
            for (i, e) in self.exports.iter().enumerate() {
                if !self.read_back(env, 1000 + i as u32, e).await {
                    // Recorded as it is: the checker reports the blocks never read back.
                    tracing::warn!(export = %e.name, "no node served the final read-back");
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
    fn refused_writes_are_failed_and_broken_ones_indeterminate() {
        assert_eq!(
            write_outcome(&ClientError::Refused { errno: EPERM }),
            Outcome::Failed
        );
        assert_eq!(
            write_outcome(&ClientError::NotSent("closed".into())),
            Outcome::Failed
        );
        assert_eq!(
            write_outcome(&ClientError::Refused { errno: 5 }),
            Outcome::Indeterminate
        );
        assert_eq!(
            write_outcome(&ClientError::Unknown("reset".into())),
            Outcome::Indeterminate
        );
        assert_eq!(
            read_outcome(&ClientError::Refused { errno: 5 }),
            Outcome::Failed
        );
    }
}
