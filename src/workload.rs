//! A verifying block workload driven through one node's LUN (over the diagnostic RPC service),
//! with its checker: the oracle for the redirector's fault tests and its benchmark.
//!
//! Every block written is self-describing: a 32-byte header (magic `CSVW`, worker, block index,
//! operation sequence number, crc32c of the rest) followed by bytes derived from (block, seq).
//! Each worker owns a disjoint set of blocks and has one request in flight at a time, so the
//! checker knows exactly which contents a read may return:
//! - the last acknowledged write, or a later write whose request failed (its outcome unknown);
//! - zeros for a block never written (or whose only writes failed).
//!
//! Anything else is a violation: an older acknowledged write (rolled back: a ghost write landed),
//! a torn or corrupt block, or another block's data. [`Workload::verify`] reads every block at the
//! end, through any node, to find lost writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::client::CtlClient;
use crate::redirect::{DiagReply, DiagRequest, diag};

const MAGIC: &[u8; 4] = b"CSVW";
const HEADER: usize = 32;

/// What to run.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The node whose LUN carries the I/O.
    pub node: u64,
    pub workers: usize,
    pub blocks_per_worker: u64,
    pub block_size: usize,
    /// Byte offset of the first block on the LUN.
    pub region: u64,
    /// Percentage of operations that are writes (the rest are reads).
    pub write_pct: u32,
    pub seed: u64,
}

/// One worker's view of its blocks: the last acknowledged seq, and failed seqs after it.
#[derive(Debug, Clone, Default)]
struct BlockState {
    acked: Option<u64>,
    unknown: Vec<u64>,
}

/// What happened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub writes: u64,
    pub reads: u64,
    pub bytes: u64,
    pub errors: Vec<String>,
    /// Reads that returned data other than allowed (rolled back, torn, foreign).
    pub violations: Vec<String>,
    pub elapsed_ms: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Completion time (ms since start) and latency of the slowest operation.
    pub max_at_ms: u64,
    #[serde(skip)]
    expected: BTreeMap<u64, BlockState>,
}

impl Report {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / (self.elapsed_ms.max(1) as f64 / 1000.0)
    }
    pub fn ops_per_s(&self) -> f64 {
        (self.reads + self.writes) as f64 / (self.elapsed_ms.max(1) as f64 / 1000.0)
    }
}

/// The contents of block `idx` written by `worker` as operation `seq`.
pub fn stamp(size: usize, worker: u32, idx: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut x = idx.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq;
    for chunk in v[HEADER..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    let crc = crc32c::crc32c(&v[HEADER..]);
    v[0..4].copy_from_slice(MAGIC);
    v[4..8].copy_from_slice(&worker.to_le_bytes());
    v[8..16].copy_from_slice(&idx.to_le_bytes());
    v[16..24].copy_from_slice(&seq.to_le_bytes());
    v[24..28].copy_from_slice(&crc.to_le_bytes());
    v
}

/// `Ok(None)` for an all-zero block, `Ok(Some((worker, idx, seq)))` for an intact stamp.
pub fn unstamp(b: &[u8]) -> Result<Option<(u32, u64, u64)>, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    if b.len() < HEADER || &b[0..4] != MAGIC {
        return Err("not a workload block".into());
    }
    let u32le = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64le = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    if crc32c::crc32c(&b[HEADER..]) != u32le(24) {
        return Err("corrupt block (crc mismatch)".into());
    }
    Ok(Some((u32le(4), u64le(8), u64le(16))))
}

impl BlockState {
    fn allows(&self, got: Option<(u32, u64, u64)>, worker: u32, idx: u64) -> Result<(), String> {
        match got {
            None if self.acked.is_none() => Ok(()),
            None => Err(format!(
                "block {idx} reads zeros after seq {:?}",
                self.acked
            )),
            Some((w, i, s)) if w == worker && i == idx => {
                if Some(s) == self.acked || self.unknown.contains(&s) {
                    Ok(())
                } else {
                    Err(format!(
                        "block {idx} holds seq {s}, expected {:?} (or unknown {:?}): {}",
                        self.acked,
                        self.unknown,
                        if self.acked.is_some_and(|a| s < a) {
                            "rolled back"
                        } else {
                            "unexpected"
                        }
                    ))
                }
            }
            Some((w, i, s)) => Err(format!(
                "block {idx} holds worker {w}'s block {i} seq {s} (misdirected)"
            )),
        }
    }
}

impl Workload {
    fn offset(&self, idx: u64) -> u64 {
        self.region + idx * self.block_size as u64
    }

    /// Runs until `stop` is set, then reports.
    pub async fn run(&self, client: Arc<CtlClient>, stop: Arc<AtomicBool>) -> Report {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..self.workers {
            let (me, client, stop) = (self.clone(), client.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                me.worker(w as u32, &client, &stop, start).await
            }));
        }
        let mut rep = Report::default();
        let mut lat: Vec<(f64, u64)> = Vec::new();
        for t in tasks {
            match t.await {
                Ok((r, l)) => {
                    rep.writes += r.writes;
                    rep.reads += r.reads;
                    rep.bytes += r.bytes;
                    rep.errors.extend(r.errors);
                    rep.violations.extend(r.violations);
                    rep.expected.extend(r.expected);
                    lat.extend(l);
                }
                Err(e) => rep.errors.push(format!("worker panicked: {e}")),
            }
        }
        rep.elapsed_ms = start.elapsed().as_millis() as u64;
        lat.sort_by(|a, b| a.0.total_cmp(&b.0));
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .map_or(0.0, |x| x.0)
        };
        rep.p50_ms = pct(0.5);
        rep.p99_ms = pct(0.99);
        if let Some(&(m, at)) = lat.last() {
            rep.max_ms = m;
            rep.max_at_ms = at;
        }
        rep
    }

    async fn worker(
        &self,
        w: u32,
        client: &CtlClient,
        stop: &AtomicBool,
        start: Instant,
    ) -> (Report, Vec<(f64, u64)>) {
        let mut rng = StdRng::seed_from_u64(self.seed ^ u64::from(w).wrapping_mul(0x51_7cc1));
        let mut rep = Report::default();
        let mut lat = Vec::new();
        let first = u64::from(w) * self.blocks_per_worker;
        let mut state: BTreeMap<u64, BlockState> = BTreeMap::new();
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let idx = first + rng.random_range(0..self.blocks_per_worker);
            let t0 = Instant::now();
            let write = rng.random_range(0..100) < self.write_pct;
            let req = if write {
                seq += 1;
                DiagRequest::Write {
                    offset: self.offset(idx),
                    data: stamp(self.block_size, w, idx, seq),
                    fua: false,
                    fence: None,
                }
            } else {
                DiagRequest::Read {
                    offset: self.offset(idx),
                    len: self.block_size as u32,
                }
            };
            let answer = diag(client, self.node, &req, Duration::from_secs(120)).await;
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            lat.push((ms, start.elapsed().as_millis() as u64));
            let st = state.entry(idx).or_default();
            match (write, answer) {
                (true, Ok(DiagReply::Done)) => {
                    rep.writes += 1;
                    rep.bytes += self.block_size as u64;
                    st.acked = Some(seq);
                    st.unknown.clear();
                }
                (false, Ok(DiagReply::Data(d))) => {
                    rep.reads += 1;
                    rep.bytes += d.len() as u64;
                    if let Err(v) = unstamp(&d).and_then(|got| st.allows(got, w, idx)) {
                        rep.violations.push(format!("read of {v}"));
                    }
                }
                (_, other) => {
                    if write {
                        st.unknown.push(seq);
                    }
                    rep.errors.push(format!(
                        "{} block {idx} at {} ms: {other:?}",
                        if write { "write" } else { "read" },
                        start.elapsed().as_millis()
                    ));
                }
            }
        }
        rep.expected = state;
        (rep, lat)
    }

    /// Reads every block the run touched through `node` and checks it holds the last
    /// acknowledged write (or a failed one after it). Returns the violations.
    pub async fn verify(&self, client: &CtlClient, node: u64, rep: &Report) -> Vec<String> {
        let mut bad = Vec::new();
        for (&idx, st) in &rep.expected {
            let w = (idx / self.blocks_per_worker) as u32;
            let req = DiagRequest::Read {
                offset: self.offset(idx),
                len: self.block_size as u32,
            };
            match diag(client, node, &req, Duration::from_secs(60)).await {
                Ok(DiagReply::Data(d)) => {
                    if let Err(v) = unstamp(&d).and_then(|got| st.allows(got, w, idx)) {
                        bad.push(format!("node {node}: lost write: {v}"));
                    }
                }
                other => bad.push(format!(
                    "node {node}: verify read of block {idx}: {other:?}"
                )),
            }
        }
        bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_describe_themselves_and_damage_is_detected() {
        let b = stamp(4096, 3, 17, 99);
        assert_eq!(unstamp(&b), Ok(Some((3, 17, 99))));
        assert_eq!(unstamp(&[0u8; 4096]), Ok(None));
        let mut torn = b.clone();
        torn[4000] ^= 1;
        assert!(unstamp(&torn).is_err());
        assert!(unstamp(&[1u8; 64]).is_err());
        let st = BlockState {
            acked: Some(5),
            unknown: vec![6],
        };
        assert!(st.allows(Some((3, 17, 5)), 3, 17).is_ok());
        assert!(st.allows(Some((3, 17, 6)), 3, 17).is_ok());
        assert!(
            st.allows(Some((3, 17, 4)), 3, 17)
                .unwrap_err()
                .contains("rolled back")
        );
        assert!(st.allows(None, 3, 17).is_err());
        assert!(st.allows(Some((2, 17, 5)), 3, 17).is_err());
        assert!(BlockState::default().allows(None, 0, 0).is_ok());
    }
}
