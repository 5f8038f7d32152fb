//! The checkers: pure functions from a history (and the final state recorded in it) to a
//! verdict. They read nothing else, so `csvctl chaos check HISTORY` reaches the same
//! verdicts offline as the run did.
//!
//! Each checker is sound with respect to the outcomes: it never treats an indeterminate
//! operation as having happened or as not having happened. A checker that cannot decide
//! (an expected node did not answer, a written block was never read back) says invalid:
//! "unknown" fails like a violation.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::history::{FinalState, History, OpKind, OpRecord, Outcome};

/// One checker's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub valid: bool,
    pub detail: String,
}

impl Verdict {
    fn ok(detail: impl Into<String>) -> Verdict {
        Verdict {
            valid: true,
            detail: detail.into(),
        }
    }

    /// Invalid, listing the first few problems and how many there were.
    fn violations(what: &str, problems: &[String]) -> Verdict {
        let mut detail = format!("{} {what}: ", problems.len());
        detail.push_str(
            &problems
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; "),
        );
        if problems.len() > 5 {
            detail.push_str("; ...");
        }
        Verdict {
            valid: false,
            detail,
        }
    }
}

/// The bound on convergence after healing (reliability goal G7).
pub const CONVERGE_BOUND_S: f64 = 30.0;

/// Names of the checkers, in report order.
pub const CHECKERS: [&str; 8] = [
    "no-lost-write",
    "no-stale-read",
    "exclusive-lock",
    "fencing",
    "fsck",
    "raft-identical",
    "direct-io",
    "converged",
];

/// Runs every checker over `h`.
pub fn check_all(h: &History) -> BTreeMap<String, Verdict> {
    let missing = || Verdict {
        valid: false,
        detail: "the history has no final state (the run did not finish)".into(),
    };
    let fin = h.final_state.as_ref();
    let mut out = BTreeMap::new();
    out.insert("no-lost-write".into(), no_lost_write(&h.ops));
    out.insert("no-stale-read".into(), no_stale_read(&h.ops));
    out.insert("exclusive-lock".into(), exclusive_lock(&h.ops));
    out.insert("fencing".into(), fencing(&h.ops));
    out.insert("fsck".into(), fin.map(fsck).unwrap_or_else(missing));
    out.insert(
        "raft-identical".into(),
        fin.map(raft_identical).unwrap_or_else(missing),
    );
    out.insert(
        "direct-io".into(),
        fin.map(direct_io).unwrap_or_else(missing),
    );
    out.insert(
        "converged".into(),
        fin.map(converged).unwrap_or_else(missing),
    );
    out
}

// ---- block register: no lost write, no stale read ----------------------------------------

/// A block register: (target, block).
type Reg<'a> = (&'a str, u64);

fn reg_name((target, block): Reg<'_>) -> String {
    if target.is_empty() {
        format!("block {block}")
    } else {
        format!("block {block} of {target}")
    }
}

struct BlockWrite<'a> {
    rec: &'a OpRecord,
    op_id: u64,
    /// When the write is certainly durable and visible to every reader (an acknowledged
    /// FUA write, or an acknowledged write followed by an acknowledged flush of the same
    /// worker, connection and target); `f64::INFINITY` if never.
    durable_s: f64,
}

/// Block writes by register, with their durability times.
fn block_writes(ops: &[OpRecord]) -> BTreeMap<Reg<'_>, Vec<BlockWrite<'_>>> {
    // Ok flushes by (workload, worker, conn): (target, invoke, return).
    type Scope<'a> = (&'a str, u32, u64);
    let mut flushes: BTreeMap<Scope<'_>, Vec<(&str, f64, f64)>> = BTreeMap::new();
    for o in ops {
        if let OpKind::Flush { target, conn } = &o.kind
            && o.outcome == Outcome::Ok
        {
            flushes
                .entry((o.workload.as_str(), o.worker, *conn))
                .or_default()
                .push((target.as_str(), o.invoke_s, o.return_s));
        }
    }
    let mut out: BTreeMap<Reg<'_>, Vec<BlockWrite<'_>>> = BTreeMap::new();
    for o in ops {
        let OpKind::BlockWrite {
            target,
            block,
            op_id,
            fua,
            conn,
            ..
        } = &o.kind
        else {
            continue;
        };
        let durable_s = if o.outcome != Outcome::Ok {
            f64::INFINITY
        } else if *fua {
            o.return_s
        } else {
            flushes
                .get(&(o.workload.as_str(), o.worker, *conn))
                .into_iter()
                .flatten()
                .filter(|(t, inv, _)| (t.is_empty() || t == target) && *inv >= o.return_s)
                .map(|(_, _, ret)| *ret)
                .fold(f64::INFINITY, f64::min)
        };
        out.entry((target.as_str(), *block))
            .or_default()
            .push(BlockWrite {
                rec: o,
                op_id: *op_id,
                durable_s,
            });
    }
    out
}

/// Problems with one ok read of `reg` that observed `observed`: corrupt, phantom,
/// misdirected, from the future, of a failed write, or older than a durable write that
/// completed before the read began.
fn read_problems(
    read: &OpRecord,
    reg: Reg<'_>,
    observed: u64,
    crc_ok: bool,
    writes: &BTreeMap<Reg<'_>, Vec<BlockWrite<'_>>>,
) -> Option<String> {
    let here = writes.get(&reg).map(Vec::as_slice).unwrap_or(&[]);
    let at = format!(
        "read op {} of {} at {:.3}s",
        read.id,
        reg_name(reg),
        read.invoke_s
    );
    if !crc_ok {
        return Some(format!(
            "{at}: corrupt block (payload does not match its crc32c, header op {observed})"
        ));
    }
    // The newest write certainly in place before the read began.
    let superseding = |after: Option<&BlockWrite<'_>>| {
        here.iter()
            .filter(|w| w.durable_s < read.invoke_s)
            .filter(|w| {
                after.is_none_or(|a| a.rec.id != w.rec.id && a.rec.return_s < w.rec.invoke_s)
            })
            .max_by(|a, b| a.durable_s.total_cmp(&b.durable_s))
            .map(|w| (w.op_id, w.rec.return_s))
    };
    if observed == 0 {
        return superseding(None).map(|(op, ret)| {
            format!("{at}: returned the initial (never written) block, but write op {op} was durable at {ret:.3}s")
        });
    }
    let Some(w) = here.iter().find(|w| w.op_id == observed) else {
        let elsewhere = writes
            .iter()
            .find(|(_, ws)| ws.iter().any(|w| w.op_id == observed))
            .map(|(r, _)| *r);
        return Some(match elsewhere {
            Some(r) => format!(
                "{at}: misdirected data (op {observed} was written to {})",
                reg_name(r)
            ),
            None => format!("{at}: phantom data (op {observed} was never written)"),
        });
    };
    if w.rec.outcome == Outcome::Failed {
        return Some(format!(
            "{at}: observed op {observed}, a write that failed ({})",
            w.rec.detail
        ));
    }
    if w.rec.invoke_s > read.return_s {
        return Some(format!(
            "{at}: observed op {observed}, invoked only at {:.3}s",
            w.rec.invoke_s
        ));
    }
    if w.rec.outcome != Outcome::Ok {
        // An indeterminate write may land at any time after its invocation.
        return None;
    }
    superseding(Some(w)).map(|(op, ret)| {
        format!("{at}: returned op {observed}, superseded by op {op} durable at {ret:.3}s")
    })
}

/// Ok block reads: (record, register, observed, crc_ok).
fn block_reads(
    ops: &[OpRecord],
    final_check: bool,
) -> impl Iterator<Item = (&OpRecord, Reg<'_>, u64, bool)> {
    ops.iter().filter_map(move |o| match &o.kind {
        OpKind::BlockRead {
            target,
            block,
            observed,
            crc_ok,
            final_check: f,
        } if *f == final_check && o.outcome == Outcome::Ok => {
            Some((o, (target.as_str(), *block), *observed, *crc_ok))
        }
        _ => None,
    })
}

/// Targets removed by an `unlink` that was not certainly refused: their blocks need no
/// read-back after healing (there is nothing left to read).
fn retired(ops: &[OpRecord]) -> BTreeSet<&str> {
    ops.iter()
        .filter(|o| o.outcome != Outcome::Failed)
        .filter_map(|o| match &o.kind {
            OpKind::Namespace { action, name } if action == "unlink" => Some(name.as_str()),
            _ => None,
        })
        .collect()
}

/// No acknowledged (durable) write is lost: the read-back after healing of every written
/// block returns the newest durable write or a write concurrent with or newer than it.
/// Blocks of a target that was removed during the run are exempt from the read-back.
pub fn no_lost_write(ops: &[OpRecord]) -> Verdict {
    let writes = block_writes(ops);
    if writes.is_empty() {
        return Verdict::ok("no block writes in this history (no nbd or fuse workload ran)");
    }
    let gone = retired(ops);
    let mut problems = Vec::new();
    let mut verified = BTreeSet::new();
    for (r, reg, observed, crc_ok) in block_reads(ops, true) {
        verified.insert(reg);
        problems.extend(read_problems(r, reg, observed, crc_ok, &writes));
    }
    let durable: Vec<Reg<'_>> = writes
        .iter()
        .filter(|(_, ws)| ws.iter().any(|w| w.durable_s.is_finite()))
        .map(|(r, _)| *r)
        .collect();
    let mut removed = 0;
    for r in &durable {
        if gone.contains(r.0) {
            removed += 1;
        } else if !verified.contains(r) {
            problems.push(format!(
                "{} has durable writes but was never read back",
                reg_name(*r)
            ));
        }
    }
    if problems.is_empty() {
        Verdict::ok(format!(
            "{} blocks with durable writes read back intact, {removed} more removed with their files ({} writes)",
            durable.len() - removed,
            writes.values().map(Vec::len).sum::<usize>()
        ))
    } else {
        Verdict::violations("lost or corrupt writes", &problems)
    }
}

/// No read during the run returns data older than a write that was durable (acknowledged
/// and flushed) before the read began, nor corrupt, phantom or misdirected data.
pub fn no_stale_read(ops: &[OpRecord]) -> Verdict {
    let writes = block_writes(ops);
    let mut problems = Vec::new();
    let mut n = 0;
    for (r, reg, observed, crc_ok) in block_reads(ops, false) {
        n += 1;
        problems.extend(read_problems(r, reg, observed, crc_ok, &writes));
    }
    if problems.is_empty() {
        Verdict::ok(if n == 0 {
            "no block reads in this history (no nbd or fuse workload ran)".to_string()
        } else {
            format!("{n} reads, none stale")
        })
    } else {
        Verdict::violations("stale or corrupt reads", &problems)
    }
}

// ---- locks and fencing --------------------------------------------------------------------

/// What the history proves about one grant (key, token): it was held at least during
/// `[from, to]`.
#[derive(Debug)]
struct Grant {
    nodes: BTreeSet<u64>,
    /// The earliest return of an ok acquire with this token: the grant existed by then.
    from: f64,
    /// The latest invocation of an ok acquire or validate with this token: the grant
    /// was still held at some point after it, and a token is never granted twice.
    to: f64,
}

fn grants(ops: &[OpRecord]) -> BTreeMap<(String, u64), Grant> {
    let mut g: BTreeMap<(String, u64), Grant> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        if let OpKind::LockAcquire {
            key,
            token: Some(t),
        } = &o.kind
        {
            let e = g.entry((key.clone(), *t)).or_insert(Grant {
                nodes: BTreeSet::new(),
                from: f64::INFINITY,
                to: f64::NEG_INFINITY,
            });
            e.nodes.insert(o.node);
            e.from = e.from.min(o.return_s);
            e.to = e.to.max(o.invoke_s);
        }
    }
    for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        if let OpKind::LockValidate { key, token } = &o.kind
            && let Some(e) = g.get_mut(&(key.clone(), *token))
        {
            e.nodes.insert(o.node);
            e.to = e.to.max(o.invoke_s);
        }
    }
    g
}

/// Never two holders of an exclusive lock at one time: the intervals in which the history
/// proves each grant was held never overlap for two grants of one key.
pub fn exclusive_lock(ops: &[OpRecord]) -> Verdict {
    let g = grants(ops);
    let mut problems = Vec::new();
    let mut by_key: BTreeMap<&str, Vec<(u64, &Grant)>> = BTreeMap::new();
    for ((k, t), gr) in &g {
        if gr.nodes.len() > 1 {
            problems.push(format!(
                "lock {k}: token {t} held through nodes {:?} (one grant, two sessions)",
                gr.nodes
            ));
        }
        by_key.entry(k).or_default().push((*t, gr));
    }
    let mut proven = 0;
    for (k, gs) in &by_key {
        let held: Vec<_> = gs.iter().filter(|(_, g)| g.to > g.from).collect();
        proven += held.len();
        for (i, (ta, a)) in held.iter().enumerate() {
            for (tb, b) in &held[i + 1..] {
                if a.from < b.to && b.from < a.to {
                    problems.push(format!(
                        "lock {k}: token {ta} (node {:?}, held {:.3}-{:.3}s) and token {tb} (node {:?}, held {:.3}-{:.3}s) overlap",
                        a.nodes, a.from, a.to, b.nodes, b.from, b.to
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Verdict::ok(format!(
            "{} grants of {} keys, {proven} with a proven holding interval; no overlap",
            g.len(),
            by_key.len()
        ))
    } else {
        Verdict::violations("exclusion violations", &problems)
    }
}

/// Something carrying a token, with bounds on when it took effect: (earliest, latest,
/// token, node).
type Tokened = (f64, f64, u64, u64);

/// Each grant (one token) with bounds on the moment it was granted.
///
/// A node's session re-acquiring a lock it still holds gets the old token back, so an ok
/// acquire does not prove when its token was granted: an earlier indeterminate acquire of
/// the same key on the same node may have made the grant, at any time after it was
/// invoked. But once a release of the key by that node completed, the node held no grant
/// of it, so a token it holds later was granted after that release was invoked. The
/// earliest moment of a grant is therefore the later of (a) the last such release before
/// the first ok acquire with the token and (b) the earliest of that acquire and any
/// indeterminate acquire of the key on the node before it. The latest moment is the first
/// return of an ok acquire with the token.
fn grant_bounds(ops: &[OpRecord]) -> Vec<Tokened> {
    #[derive(Default)]
    struct Group {
        /// (return, invoke) of ok releases, sorted by return, invoke as a running max.
        releases: Vec<(f64, f64)>,
        /// The earliest invocation of an indeterminate acquire.
        first_unknown: Vec<f64>,
    }
    let mut groups: BTreeMap<(u64, &str), Group> = BTreeMap::new();
    let mut first: BTreeMap<u64, &OpRecord> = BTreeMap::new();
    let mut latest: BTreeMap<u64, f64> = BTreeMap::new();
    for o in ops {
        match (&o.kind, o.outcome) {
            (OpKind::LockRelease { key, .. }, Outcome::Ok) => groups
                .entry((o.node, key))
                .or_default()
                .releases
                .push((o.return_s, o.invoke_s)),
            (OpKind::LockAcquire { key, .. }, Outcome::Indeterminate) => groups
                .entry((o.node, key))
                .or_default()
                .first_unknown
                .push(o.invoke_s),
            (OpKind::LockAcquire { token: Some(t), .. }, Outcome::Ok) => {
                let e = first.entry(*t).or_insert(o);
                if o.invoke_s < e.invoke_s {
                    *e = o;
                }
                let l = latest.entry(*t).or_insert(f64::INFINITY);
                *l = l.min(o.return_s);
            }
            _ => {}
        }
    }
    for g in groups.values_mut() {
        g.releases.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut m = f64::NEG_INFINITY;
        for r in g.releases.iter_mut() {
            m = m.max(r.1);
            r.1 = m;
        }
        g.first_unknown.sort_by(f64::total_cmp);
    }
    let mut out = Vec::new();
    for (t, a) in first {
        let OpKind::LockAcquire { key, .. } = &a.kind else {
            continue;
        };
        let mut earliest = a.invoke_s;
        if let Some(g) = groups.get(&(a.node, key.as_str())) {
            if let Some(u) = g.first_unknown.first() {
                earliest = earliest.min(*u);
            }
            let i = g.releases.partition_point(|r| r.0 < a.invoke_s);
            if i > 0 {
                earliest = earliest.max(g.releases[i - 1].1);
            }
        }
        out.push((earliest, latest[&t], t, a.node));
    }
    out
}

/// Fencing tokens are monotonic: a grant certainly made after another has a larger token
/// (tokens increase across every grant of any lock), and a fenced write accepted after
/// another accepted write to the same file never carries an older token.
pub fn fencing(ops: &[OpRecord]) -> Verdict {
    let mut problems = Vec::new();
    let mut owner: BTreeMap<u64, (&str, u64)> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        if let OpKind::LockAcquire {
            key,
            token: Some(t),
        } = &o.kind
        {
            match owner.get(t) {
                Some((k0, n0)) if (*k0, *n0) != (key.as_str(), o.node) => problems.push(format!(
                    "token {t} granted for {k0} on node {n0} and for {key} on node {}",
                    o.node
                )),
                _ => {
                    owner.insert(*t, (key, o.node));
                }
            }
        }
    }
    let mut grants = grant_bounds(ops);
    problems.extend(monotonic(&mut grants, "grant"));
    // Fenced writes per file.
    let mut writes: BTreeMap<u64, Vec<Tokened>> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        if let OpKind::FencedWrite { ino, token, .. } = o.kind {
            writes
                .entry(ino)
                .or_default()
                .push((o.invoke_s, o.return_s, token, o.node));
        }
    }
    let mut writes_n = 0;
    for (ino, ws) in writes.iter_mut() {
        writes_n += ws.len();
        for p in monotonic(ws, "write") {
            problems.push(format!("file {ino}: {p}"));
        }
    }
    if problems.is_empty() {
        Verdict::ok(format!(
            "{} grants and {writes_n} accepted fenced writes, tokens monotonic",
            grants.len()
        ))
    } else {
        Verdict::violations("fencing violations", &problems)
    }
}

/// For items (earliest, latest, token, node): an item that certainly took effect after
/// another (its earliest moment is after the other's latest) never carries a smaller token.
fn monotonic(items: &mut [Tokened], what: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut by_latest: Vec<(f64, u64, u64)> = items.iter().map(|o| (o.1, o.2, o.3)).collect();
    by_latest.sort_by(|a, b| a.0.total_cmp(&b.0));
    items.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut i = 0;
    // The largest token among items that took effect before the current one's earliest.
    let mut max: Option<(u64, f64, u64)> = None;
    for (earliest, _, t, node) in items.iter() {
        while i < by_latest.len() && by_latest[i].0 < *earliest {
            let (latest, tok, n) = by_latest[i];
            if max.is_none_or(|(m, _, _)| tok > m) {
                max = Some((tok, latest, n));
            }
            i += 1;
        }
        if let Some((m, latest, n)) = max
            && m > *t
        {
            problems.push(format!(
                "{what} with token {t} (node {node}, not before {earliest:.3}s) came after {what} with token {m} (node {n}, by {latest:.3}s)"
            ));
        }
    }
    problems
}

// ---- the final state ---------------------------------------------------------------------

/// Allocation and namespace invariants from every replica's fsck.
pub fn fsck(f: &FinalState) -> Verdict {
    let mut problems = Vec::new();
    for n in &f.nodes {
        match f.fsck.iter().find(|x| x.node == *n) {
            None => problems.push(format!("node {n}: no fsck answer")),
            Some(x) => match &x.violations {
                None => problems.push(format!("node {n}: fsck failed: {}", x.error)),
                Some(v) => {
                    for e in v {
                        problems.push(format!("node {n} at index {}: {e}", x.applied));
                    }
                }
            },
        }
    }
    if problems.is_empty() {
        Verdict::ok(format!(
            "{} replicas checked: every block owned once, no overlaps, free space accounted for, namespace consistent",
            f.nodes.len()
        ))
    } else {
        Verdict::violations("fsck problems", &problems)
    }
}

/// Every replica holds the same state machine at the same applied index.
pub fn raft_identical(f: &FinalState) -> Verdict {
    let mut problems = Vec::new();
    let mut seen: BTreeMap<(u64, &str), Vec<u64>> = BTreeMap::new();
    for n in &f.nodes {
        match f.digests.iter().find(|d| d.node == *n) {
            Some(d) => match (d.applied, d.digest.as_deref()) {
                (Some(a), Some(h)) => seen.entry((a, h)).or_default().push(*n),
                _ => problems.push(format!("node {n}: no digest ({})", d.error)),
            },
            None => problems.push(format!("node {n}: no digest")),
        }
    }
    if seen.len() > 1 {
        let groups: Vec<String> = seen
            .iter()
            .map(|((a, h), ns)| format!("nodes {ns:?} at index {a}: {}", &h[..h.len().min(16)]))
            .collect();
        problems.push(format!("replicas differ: {}", groups.join(" / ")));
    }
    match (problems.is_empty(), seen.iter().next()) {
        (true, Some(((a, h), ns))) => Verdict::ok(format!(
            "{} replicas identical at index {a} (blake3 {})",
            ns.len(),
            &h[..h.len().min(16)]
        )),
        (true, None) => Verdict {
            valid: false,
            detail: "no replica reported a digest".into(),
        },
        _ => Verdict::violations("replica problems", &problems),
    }
}

/// Every node is alive and back on direct SAN I/O.
pub fn direct_io(f: &FinalState) -> Verdict {
    let mut problems = Vec::new();
    for n in &f.nodes {
        match f.paths.iter().find(|p| p.node == *n) {
            Some(p) if p.alive && p.path == "direct" => {}
            Some(p) => problems.push(format!(
                "node {n}: {} on path {:?}",
                if p.alive { "alive" } else { "NOT answering" },
                p.path
            )),
            None => problems.push(format!("node {n}: no path state")),
        }
    }
    if problems.is_empty() {
        Verdict::ok(format!("{} nodes on direct I/O", f.nodes.len()))
    } else {
        Verdict::violations("nodes not on direct I/O", &problems)
    }
}

/// The cluster converged after healing within [`CONVERGE_BOUND_S`].
pub fn converged(f: &FinalState) -> Verdict {
    match f.converge_s {
        Some(s) if s <= CONVERGE_BOUND_S => Verdict::ok(format!(
            "ready {s:.2}s after healing (bound {CONVERGE_BOUND_S:.0}s)"
        )),
        Some(s) => Verdict {
            valid: false,
            detail: format!("ready only {s:.2}s after healing (bound {CONVERGE_BOUND_S:.0}s)"),
        },
        None => Verdict {
            valid: false,
            detail: "the cluster did not become ready after healing".into(),
        },
    }
}
