//! The history of a chaos run: every client operation with its invoke and return times
//! and its outcome, every fault with its times, and the final state gathered after
//! healing. It is what the checkers read, and it is written as JSON lines so that a run
//! can be checked again offline (`csvctl chaos check HISTORY`).
//!
//! Invariants:
//! - times are seconds since the run started, from one monotonic clock;
//! - `return_s >= invoke_s` for every operation;
//! - an operation is `ok` only when the service acknowledged it, `failed` only when it
//!   certainly did not take effect, and `indeterminate` otherwise (a timeout, a lost
//!   connection after the request was sent): an indeterminate write may take effect at
//!   any time after its invocation, even after the run.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What the harness failed to do with a history file.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot write the history file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the history file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line} of {path} is not a history record")]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has no run header (is it a chaos history?)")]
    NoHeader { path: PathBuf },
}

/// The outcome of one client operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Failed,
    Indeterminate,
}

/// What one operation did. Workloads add variants as they appear (append only: old
/// histories must stay readable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpKind {
    /// Acquire an exclusive lock through a node's session; `token` is the grant (ok only).
    LockAcquire { key: String, token: Option<u64> },
    /// Linearizable check that the node's session still holds `key` with `token`.
    LockValidate { key: String, token: u64 },
    /// Release of `key`; `token` is the grant the worker believed it held, if any.
    LockRelease { key: String, token: Option<u64> },
    /// A data write to file `ino` fenced by `token` (the holder of `data:{ino}`).
    FencedWrite {
        ino: u64,
        token: u64,
        file_block: u64,
    },
    /// A namespace change (`create`, `rename`, `unlink`) of `name`. For files written
    /// with block writes, `name` is their `target`: an `unlink` that was not certainly
    /// refused retires the target's blocks from the read-back after healing.
    Namespace { action: String, name: String },
    /// A self-describing block write: the block carries `op_id` and the crc32c of its
    /// payload. `fua`: durable when acknowledged. A block register is named by
    /// (`target`, `block`): `target` is the export or file written (empty in histories of
    /// a single target); `conn` is the connection or open file it went through (the scope
    /// of a [`OpKind::Flush`]).
    BlockWrite {
        #[serde(default, skip_serializing_if = "String::is_empty")]
        target: String,
        block: u64,
        op_id: u64,
        crc: u32,
        fua: bool,
        #[serde(default, skip_serializing_if = "is_zero")]
        conn: u64,
    },
    /// A block read: the op id found in the block header (0: never written), and
    /// whether the payload matched the crc32c in the header. `final_check`: the read-back
    /// after healing.
    BlockRead {
        #[serde(default, skip_serializing_if = "String::is_empty")]
        target: String,
        block: u64,
        observed: u64,
        crc_ok: bool,
        final_check: bool,
    },
    /// A flush (NBD FLUSH, `fsync`): once ok, every write this worker had completed before
    /// it on the same `conn` to `target` (to any target if empty) is durable.
    Flush {
        #[serde(default, skip_serializing_if = "String::is_empty")]
        target: String,
        #[serde(default, skip_serializing_if = "is_zero")]
        conn: u64,
    },
    /// Reserve free blocks to the worker's node session.
    Reserve { blocks: u64 },
    /// Give reserved blocks back to the pool.
    Unreserve { blocks: u64 },
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpRecord {
    pub id: u64,
    pub workload: String,
    pub worker: u32,
    pub node: u64,
    #[serde(flatten)]
    pub kind: OpKind,
    pub invoke_s: f64,
    pub return_s: f64,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// One injected fault, as it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRecord {
    pub kind: String,
    /// The node it hit (resolved at injection time, e.g. the leader of that moment).
    pub node: Option<u64>,
    pub start_s: f64,
    pub end_s: f64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// The stall the fault itself measured (a migration's handoff time), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_s: Option<f64>,
}

/// The first line of a history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunHeader {
    pub seed: u64,
    pub nodes: usize,
    pub duration_s: f64,
    pub faults: Vec<String>,
    pub workloads: Vec<String>,
    pub version: String,
}

/// One node's fsck answer (`None` violations: the node did not answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFsck {
    pub node: u64,
    pub applied: u64,
    pub violations: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// One node's state digest after healing (hex blake3), or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDigest {
    pub node: u64,
    pub applied: Option<u64>,
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// One node's SAN path state after healing, as `csvctl status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePath {
    pub node: u64,
    pub alive: bool,
    pub path: String,
}

/// The cluster's state after every fault was healed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FinalState {
    /// Seconds from the end of healing until the cluster was ready again (one leader,
    /// every node answering with a session), or `None` if it never was.
    pub converge_s: Option<f64>,
    pub fsck: Vec<NodeFsck>,
    pub digests: Vec<NodeDigest>,
    pub paths: Vec<NodePath>,
    /// Nodes the harness expected to answer.
    pub nodes: Vec<u64>,
}

/// One line of a history file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    Run(RunHeader),
    Op(OpRecord),
    Fault(FaultRecord),
    Final(FinalState),
}

/// A whole history in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    pub header: RunHeader,
    pub ops: Vec<OpRecord>,
    pub faults: Vec<FaultRecord>,
    pub final_state: Option<FinalState>,
}

impl History {
    /// Reads a history file written by [`Recorder`].
    pub fn load(path: &Path) -> Result<History, HistoryError> {
        let f = std::fs::File::open(path).map_err(|source| HistoryError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut header = None;
        let (mut ops, mut faults, mut final_state) = (Vec::new(), Vec::new(), None);
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|source| HistoryError::Read {
                path: path.to_owned(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let entry: Entry =
                serde_json::from_str(&line).map_err(|source| HistoryError::Parse {
                    path: path.to_owned(),
                    line: i + 1,
                    source,
                })?;
            match entry {
                Entry::Run(h) => header = Some(h),
                Entry::Op(o) => ops.push(o),
                Entry::Fault(f) => faults.push(f),
                Entry::Final(s) => final_state = Some(s),
            }
        }
        let header = header.ok_or_else(|| HistoryError::NoHeader {
            path: path.to_owned(),
        })?;
        Ok(History {
            header,
            ops,
            faults,
            final_state,
        })
    }
}

/// Records a run as it happens: keeps it in memory for the checkers and appends every
/// entry to the history file, so a crash of the harness still leaves the history so far.
pub struct Recorder {
    start: std::sync::RwLock<Instant>,
    next_id: AtomicU64,
    path: PathBuf,
    inner: Mutex<RecorderInner>,
}

struct RecorderInner {
    out: BufWriter<std::fs::File>,
    ops: Vec<OpRecord>,
    faults: Vec<FaultRecord>,
    final_state: Option<FinalState>,
    error: Option<std::io::Error>,
}

impl Recorder {
    /// Creates (truncates) the history file and writes the header.
    pub fn create(path: &Path, header: &RunHeader) -> Result<Recorder, HistoryError> {
        let werr = |source| HistoryError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(werr)?;
        }
        let f = std::fs::File::create(path).map_err(werr)?;
        let rec = Recorder {
            start: std::sync::RwLock::new(Instant::now()),
            next_id: AtomicU64::new(1),
            path: path.to_owned(),
            inner: Mutex::new(RecorderInner {
                out: BufWriter::new(f),
                ops: Vec::new(),
                faults: Vec::new(),
                final_state: None,
                error: None,
            }),
        };
        rec.write(&Entry::Run(header.clone()));
        Ok(rec)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Seconds since the run started.
    pub fn now(&self) -> f64 {
        self.start
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            .as_secs_f64()
    }

    /// Starts the run's clock now (when the workloads start, after their preparation).
    pub fn start_clock(&self) {
        *self.start.write().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// A fresh operation id (unique in this run, never 0).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, entry: &Entry) {
        let mut g = self.lock();
        if g.error.is_some() {
            return;
        }
        let res = serde_json::to_writer(&mut g.out, entry)
            .map_err(std::io::Error::other)
            .and_then(|_| g.out.write_all(b"\n"));
        if let Err(e) = res {
            g.error = Some(e);
        }
    }

    pub fn op(&self, rec: OpRecord) {
        self.write(&Entry::Op(rec.clone()));
        self.lock().ops.push(rec);
    }

    pub fn fault(&self, rec: FaultRecord) {
        self.write(&Entry::Fault(rec.clone()));
        self.lock().faults.push(rec);
    }

    pub fn final_state(&self, state: FinalState) {
        self.write(&Entry::Final(state.clone()));
        self.lock().final_state = Some(state);
    }

    /// Flushes the file; reports the first write error of the run, if any.
    pub fn flush(&self) -> Result<(), HistoryError> {
        let mut g = self.lock();
        let werr = |source| HistoryError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(e) = g.error.take() {
            return Err(werr(e));
        }
        g.out.flush().map_err(werr)
    }

    /// The history so far.
    pub fn snapshot(&self, header: &RunHeader) -> History {
        let g = self.lock();
        History {
            header: header.clone(),
            ops: g.ops.clone(),
            faults: g.faults.clone(),
            final_state: g.final_state.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_history_reads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        let header = RunHeader {
            seed: 7,
            nodes: 3,
            duration_s: 1.5,
            faults: vec!["kill".into()],
            workloads: vec!["meta".into()],
            version: "test".into(),
        };
        let rec = Recorder::create(&path, &header).unwrap();
        rec.op(OpRecord {
            id: rec.next_id(),
            workload: "meta".into(),
            worker: 1,
            node: 2,
            kind: OpKind::LockAcquire {
                key: "k".into(),
                token: Some(5),
            },
            invoke_s: 0.1,
            return_s: 0.2,
            outcome: Outcome::Ok,
            detail: String::new(),
        });
        rec.op(OpRecord {
            id: rec.next_id(),
            workload: "nbd".into(),
            worker: 0,
            node: 1,
            kind: OpKind::BlockRead {
                target: "vm1.img".into(),
                block: 3,
                observed: 9,
                crc_ok: false,
                final_check: true,
            },
            invoke_s: 0.3,
            return_s: 0.4,
            outcome: Outcome::Indeterminate,
            detail: "timeout".into(),
        });
        rec.fault(FaultRecord {
            kind: "pause".into(),
            node: Some(1),
            start_s: 0.5,
            end_s: 0.9,
            detail: String::new(),
            stall_s: None,
        });
        rec.final_state(FinalState {
            converge_s: Some(0.25),
            nodes: vec![1, 2, 3],
            ..Default::default()
        });
        rec.flush().unwrap();
        let mem = rec.snapshot(&header);
        let disk = History::load(&path).unwrap();
        assert_eq!(mem, disk);
        assert_eq!(disk.ops.len(), 2);
        assert!(disk.final_state.is_some());
    }

    #[test]
    fn records_of_older_histories_still_read() {
        let w: Entry = serde_json::from_str(
            r#"{"type":"op","id":1,"workload":"nbd","worker":0,"node":1,"op":"block_write","block":2,"op_id":1,"crc":5,"fua":false,"invoke_s":0.0,"return_s":0.1,"outcome":"ok"}"#,
        )
        .unwrap();
        let Entry::Op(w) = w else { panic!() };
        assert_eq!(
            w.kind,
            OpKind::BlockWrite {
                target: String::new(),
                block: 2,
                op_id: 1,
                crc: 5,
                fua: false,
                conn: 0
            }
        );
        let f: Entry = serde_json::from_str(
            r#"{"type":"op","id":2,"workload":"nbd","worker":0,"node":1,"op":"flush","invoke_s":0.1,"return_s":0.2,"outcome":"ok"}"#,
        )
        .unwrap();
        let Entry::Op(f) = f else { panic!() };
        assert_eq!(
            f.kind,
            OpKind::Flush {
                target: String::new(),
                conn: 0
            }
        );
        // And the new fields are written only when set.
        let line = serde_json::to_string(&f).unwrap();
        assert!(!line.contains("conn") && !line.contains("target"), "{line}");
    }

    #[test]
    fn a_file_without_header_or_with_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(
            &p,
            "{\"type\":\"fault\",\"kind\":\"kill\",\"node\":1,\"start_s\":0,\"end_s\":1}\n",
        )
        .unwrap();
        assert!(matches!(
            History::load(&p),
            Err(HistoryError::NoHeader { .. })
        ));
        std::fs::write(&p, "not json\n").unwrap();
        assert!(matches!(
            History::load(&p),
            Err(HistoryError::Parse { line: 1, .. })
        ));
    }
}
