//! Live connections as the daemon sees them: identity, in-flight accounting, write revocation.
//!
//! A [`ConnectionHandle`] exists for every connection in transmission phase. The daemon uses it
//! for the live-migration handoff: [`ConnectionHandle::revoke_writes`] makes every write-type
//! request admitted afterwards fail with `EPERM` (never silently succeed), and
//! [`ConnectionHandle::drain_writes`] waits for the writes admitted before the revocation to
//! finish. Admission and revocation are serialised through one watch channel, so no write can
//! slip between "revoked" and "drained".

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Identifies a connection for the lifetime of the server.
pub type ConnectionId = u64;

#[derive(Debug, Default, Clone, Copy)]
struct Gate {
    revoked: bool,
    writes: usize,
    requests: usize,
}

struct Inner {
    id: ConnectionId,
    export: String,
    peer: String,
    read_only: bool,
    gate: watch::Sender<Gate>,
    kill: CancellationToken,
}

/// Shared handle on one connection; cheap to clone.
#[derive(Clone)]
pub struct ConnectionHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ConnectionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionHandle")
            .field("id", &self.inner.id)
            .field("export", &self.inner.export)
            .field("peer", &self.inner.peer)
            .finish()
    }
}

/// The connection refused a write-type request because writes were revoked.
#[derive(Debug)]
pub(crate) struct Revoked;

/// Counts one admitted request until dropped.
pub(crate) struct Admission {
    gate: watch::Sender<Gate>,
    write: bool,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let write = self.write;
        // Waiters only wait for a count to reach zero: wake them then, not on every request.
        self.gate.send_if_modified(|g| {
            g.requests -= 1;
            if write {
                g.writes -= 1;
            }
            g.requests == 0 || (write && g.writes == 0)
        });
    }
}

impl ConnectionHandle {
    pub(crate) fn new(id: ConnectionId, export: String, peer: String, read_only: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                export,
                peer,
                read_only,
                gate: watch::Sender::new(Gate::default()),
                kill: CancellationToken::new(),
            }),
        }
    }

    pub fn id(&self) -> ConnectionId {
        self.inner.id
    }

    /// The export name the client selected.
    pub fn export(&self) -> &str {
        &self.inner.export
    }

    /// The peer address (`ip:port`, or the unix socket path).
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// Whether the export was opened read-only.
    pub fn read_only(&self) -> bool {
        self.inner.read_only
    }

    /// From now on, WRITE, WRITE_ZEROES and TRIM on this connection fail with `EPERM`.
    pub fn revoke_writes(&self) {
        self.inner.gate.send_modify(|g| g.revoked = true);
    }

    pub fn writes_revoked(&self) -> bool {
        self.inner.gate.borrow().revoked
    }

    /// Waits until no write-type request admitted on this connection is still running.
    pub async fn drain_writes(&self) {
        let mut rx = self.inner.gate.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|g| g.writes == 0).await;
    }

    /// Waits until no request at all is running on this connection.
    pub async fn drain(&self) {
        let mut rx = self.inner.gate.subscribe();
        let _ = rx.wait_for(|g| g.requests == 0).await;
    }

    /// Revokes writes, then waits for the admitted ones: after this returns, the connection
    /// can no longer change the export.
    pub async fn revoke_and_drain(&self) {
        self.revoke_writes();
        self.drain_writes().await;
    }

    /// Requests currently running on this connection.
    pub fn in_flight(&self) -> usize {
        self.inner.gate.borrow().requests
    }

    /// Closes the connection: it stops reading requests, finishes the running ones, and
    /// disconnects.
    pub fn disconnect(&self) {
        self.inner.kill.cancel();
    }

    pub(crate) fn kill_token(&self) -> &CancellationToken {
        &self.inner.kill
    }

    /// Admits a request; write-type requests are refused once writes are revoked.
    pub(crate) fn admit(&self, write: bool) -> Result<Admission, Revoked> {
        let mut admitted = false;
        self.inner.gate.send_if_modified(|g| {
            if write && g.revoked {
                return false;
            }
            g.requests += 1;
            if write {
                g.writes += 1;
            }
            admitted = true;
            // Nobody waits for a count to grow.
            false
        });
        if admitted {
            Ok(Admission {
                gate: self.inner.gate.clone(),
                write,
            })
        } else {
            Err(Revoked)
        }
    }
}

/// Learns of connections entering and leaving transmission (the daemon's hook).
pub trait ConnectionEvents: Send + Sync + 'static {
    fn opened(&self, _conn: &ConnectionHandle) {}
    fn closed(&self, _conn: &ConnectionHandle) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn revoked_connection_refuses_new_writes_but_allows_reads() {
        let c = ConnectionHandle::new(1, "e".into(), "p".into(), false);
        let w = c.admit(true).unwrap();
        c.revoke_writes();
        assert!(c.admit(true).is_err());
        let r = c.admit(false).unwrap();
        assert_eq!(c.in_flight(), 2);
        drop(w);
        drop(r);
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn drain_waits_for_admitted_writes() {
        let c = ConnectionHandle::new(1, "e".into(), "p".into(), false);
        let w = c.admit(true).unwrap();
        let c2 = c.clone();
        let drained = tokio::spawn(async move { c2.revoke_and_drain().await });
        // Wait until the revocation is visible, then check the drain is still pending.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !c.writes_revoked() {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        assert!(!drained.is_finished());
        drop(w);
        tokio::time::timeout(Duration::from_secs(5), drained)
            .await
            .unwrap()
            .unwrap();
    }
}
