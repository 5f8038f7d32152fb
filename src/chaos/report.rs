//! The report of a chaos run, computed from its history alone (so `chaos check` prints
//! the same report offline): operation counts, each fault with the stall it caused, and
//! the checkers' verdicts.
//!
//! The `--json` form is a contract: `{"valid", "seed", "nodes", "duration_s", "ops":
//! {"ok", "failed", "indeterminate"}, "faults": [{"kind", "node", "start_s", "end_s",
//! "stall_s"}], "checkers": {NAME: {"valid", "detail"}}, "history"}`. Further fields may
//! be added; none of these may change meaning.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::checker::{self, Verdict};
use super::history::{History, OpRecord, Outcome};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpCounts {
    pub ok: u64,
    pub failed: u64,
    pub indeterminate: u64,
}

impl OpCounts {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Indeterminate => self.indeterminate += 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultReport {
    pub kind: String,
    pub node: Option<u64>,
    pub start_s: f64,
    pub end_s: f64,
    /// The stall the fault measured itself (a migration's handoff), else the longest
    /// stall any workload saw in this fault's window.
    pub stall_s: f64,
    pub stall_by_workload: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub valid: bool,
    pub seed: u64,
    pub nodes: usize,
    pub duration_s: f64,
    pub ops: OpCounts,
    pub faults: Vec<FaultReport>,
    pub checkers: BTreeMap<String, Verdict>,
    pub history: String,
    pub ops_by_workload: BTreeMap<String, OpCounts>,
    pub max_stall_s: f64,
    pub converge_s: Option<f64>,
}

/// The longest time in `[start, end]`, extended to the first success after `end`, without
/// a successful operation completing. `ok_returns` is sorted; `run_end` bounds a stall
/// that never ended.
pub fn stall(ok_returns: &[f64], start: f64, end: f64, run_end: f64) -> f64 {
    let mut last = start;
    let mut worst: f64 = 0.0;
    let from = ok_returns.partition_point(|t| *t <= start);
    for &t in &ok_returns[from..] {
        worst = worst.max(t - last);
        last = t;
        if t >= end {
            return worst;
        }
    }
    worst.max(run_end.max(end) - last)
}

impl Report {
    /// Checks `h` and summarises it.
    pub fn from_history(h: &History, history_path: &str) -> Report {
        let checkers = checker::check_all(h);
        let mut ops = OpCounts::default();
        let mut by_workload: BTreeMap<String, OpCounts> = BTreeMap::new();
        let mut ok_returns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for o in &h.ops {
            ops.add(o.outcome);
            by_workload
                .entry(o.workload.clone())
                .or_default()
                .add(o.outcome);
            if o.outcome == Outcome::Ok {
                ok_returns
                    .entry(o.workload.clone())
                    .or_default()
                    .push(o.return_s);
            }
        }
        for v in ok_returns.values_mut() {
            v.sort_by(f64::total_cmp);
        }
        let run_end = h
            .ops
            .iter()
            .map(|o: &OpRecord| o.return_s)
            .fold(h.header.duration_s, f64::max);
        let faults: Vec<FaultReport> = h
            .faults
            .iter()
            .map(|f| {
                let stall_by_workload: BTreeMap<String, f64> = by_workload
                    .keys()
                    .map(|w| {
                        let r = ok_returns.get(w).map(Vec::as_slice).unwrap_or(&[]);
                        (w.clone(), stall(r, f.start_s, f.end_s, run_end))
                    })
                    .collect();
                FaultReport {
                    kind: f.kind.clone(),
                    node: f.node,
                    start_s: f.start_s,
                    end_s: f.end_s,
                    stall_s: f
                        .stall_s
                        .unwrap_or_else(|| stall_by_workload.values().copied().fold(0.0, f64::max)),
                    stall_by_workload,
                    detail: f.detail.clone(),
                }
            })
            .collect();
        Report {
            valid: checkers.values().all(|v| v.valid),
            seed: h.header.seed,
            nodes: h.header.nodes,
            duration_s: h.header.duration_s,
            ops,
            max_stall_s: faults.iter().map(|f| f.stall_s).fold(0.0, f64::max),
            faults,
            checkers,
            history: history_path.to_string(),
            ops_by_workload: by_workload,
            converge_s: h.final_state.as_ref().and_then(|f| f.converge_s),
        }
    }

    /// The human-readable report.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "chaos run: seed {}  nodes {}  duration {:.0}s  verdict: {}",
            self.seed,
            self.nodes,
            self.duration_s,
            if self.valid { "VALID" } else { "INVALID" }
        );
        let _ = writeln!(
            s,
            "operations: {} ok, {} failed, {} indeterminate",
            self.ops.ok, self.ops.failed, self.ops.indeterminate
        );
        for (w, c) in &self.ops_by_workload {
            let _ = writeln!(
                s,
                "  {w:<6} {} ok, {} failed, {} indeterminate",
                c.ok, c.failed, c.indeterminate
            );
        }
        let _ = writeln!(
            s,
            "\nfaults: {}  (max stall {:.2}s)",
            self.faults.len(),
            self.max_stall_s
        );
        if !self.faults.is_empty() {
            let _ = writeln!(
                s,
                "  {:<8} {:>4} {:>9} {:>9} {:>8}  detail",
                "kind", "node", "start s", "end s", "stall s"
            );
            for f in &self.faults {
                let _ = writeln!(
                    s,
                    "  {:<8} {:>4} {:>9.2} {:>9.2} {:>8.2}  {}",
                    f.kind,
                    f.node.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                    f.start_s,
                    f.end_s,
                    f.stall_s,
                    f.detail
                );
            }
        }
        let _ = writeln!(s, "\ncheckers:");
        for name in checker::CHECKERS {
            if let Some(v) = self.checkers.get(name) {
                let _ = writeln!(
                    s,
                    "  {:<15} {:<7} {}",
                    name,
                    if v.valid { "valid" } else { "INVALID" },
                    v.detail
                );
            }
        }
        let _ = writeln!(s, "\nhistory: {}", self.history);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_is_the_longest_gap_in_the_window_including_past_its_end() {
        let oks = [0.5, 1.0, 1.1, 3.0, 3.2, 6.0, 6.1];
        // window [1, 4]: gaps 1.0->1.1, 1.1->3.0 (1.9), 3.0->3.2, then first ok after 4 is 6.0 (2.8)
        assert!((stall(&oks, 1.0, 4.0, 10.0) - 2.8).abs() < 1e-9);
        // window [0, 0.7]: 0->0.5 (0.5), 0.5->1.0 (0.5)
        assert!((stall(&oks, 0.0, 0.7, 10.0) - 0.5).abs() < 1e-9);
        // nothing ever succeeds again: stalled until the end of the run
        assert!((stall(&oks, 6.5, 7.0, 10.0) - 3.5).abs() < 1e-9);
        assert!((stall(&[], 2.0, 3.0, 5.0) - 3.0).abs() < 1e-9);
    }
}
