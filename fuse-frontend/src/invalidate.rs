//! Kernel cache invalidation driven by the metadata change feed.
//!
//! Runs on its own thread, never on the path of a FUSE request (an invalidation may wait
//! for a directory lock that an in-flight request holds; the request's reply does not
//! depend on this thread, so it cannot deadlock). A lagging feed only loses
//! invalidations, and the short TTLs bound how long the kernel keeps what it missed.

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use csv_core::op::{Op, Response};
use csv_core::volume::Applied;
use fuser::{INodeNo, Notifier};
use tokio::sync::broadcast;

pub(crate) fn spawn(mut feed: broadcast::Receiver<Applied>, n: Notifier, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("fuse-inval".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match feed.blocking_recv() {
                    Ok(a) => apply(&n, &a),
                    Err(broadcast::error::RecvError::Lagged(k)) => {
                        tracing::debug!(missed = k, "invalidation feed lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the invalidation thread; relying on TTLs");
    }
}

fn entry(n: &Notifier, parent: u64, name: &str) {
    let _ = n.inval_entry(INodeNo(parent), OsStr::new(name));
    attrs(n, parent);
}

fn attrs(n: &Notifier, ino: u64) {
    let _ = n.inval_inode(INodeNo(ino), -1, 0);
}

fn apply(n: &Notifier, a: &Applied) {
    if matches!(a.response, Response::Err(_)) {
        return;
    }
    match &a.op {
        Op::Create { parent, name, .. } => entry(n, *parent, name),
        Op::Link {
            ino,
            new_parent,
            new_name,
        } => {
            entry(n, *new_parent, new_name);
            attrs(n, *ino);
        }
        Op::Unlink { parent, name } | Op::Rmdir { parent, name } => entry(n, *parent, name),
        Op::Rename {
            parent,
            name,
            new_parent,
            new_name,
            ..
        } => {
            entry(n, *parent, name);
            entry(n, *new_parent, new_name);
        }
        Op::SetAttr { ino, .. }
        | Op::SetXattr { ino, .. }
        | Op::RemoveXattr { ino, .. }
        | Op::CommitWrite { ino, .. }
        | Op::Fallocate { ino, .. } => attrs(n, *ino),
        _ => {}
    }
}
