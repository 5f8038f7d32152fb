//! Session-owned locks with fencing tokens.
//!
//! A lock exists while it has holders: shared holders coexist, an exclusive holder is
//! alone. Every new grant (first acquisition or upgrade) takes the next token from
//! `last_token`, so tokens are strictly increasing across all locks. A session that
//! holds a lock exclusively and asks for it shared keeps its exclusive grant and token
//! (exclusive covers shared). Removing the last holder removes the lock, and with it
//! any pending break request.

use csv_core::meta::{LockHolder, LockMode, MetaError, NodeId, SessionId};

use super::{Lock, OpResult, VolumeState};
use crate::types::Response;

impl VolumeState {
    pub(super) fn acquire(&mut self, session: SessionId, key: &str, mode: LockMode) -> OpResult {
        let node = self.live_session(session)?.info.node;
        if key.is_empty() {
            return Err(MetaError::Invalid("empty lock key".into()));
        }
        let holders = self.locks.get(key).map_or(&[][..], |l| &l.holders[..]);
        let mine = holders.iter().find(|h| h.session == session);
        let granted = match (mine, mode) {
            // Same mode again, or shared asked while holding exclusive: same grant.
            (Some(h), _) if h.mode == mode || mode == LockMode::Shared => {
                return Ok(Response::Lock(h.token));
            }
            // Upgrade: only a sole shared holder.
            (Some(_), _) => holders.len() == 1,
            (None, LockMode::Shared) => holders.iter().all(|h| h.mode == LockMode::Shared),
            (None, LockMode::Exclusive) => holders.is_empty(),
        };
        if !granted {
            return Err(MetaError::LockBusy {
                key: key.to_string(),
            });
        }
        self.last_token += 1;
        let holder = LockHolder {
            session,
            node,
            mode,
            token: self.last_token,
            since_ms: self.now_ms,
        };
        let lock = self.locks.entry(key.to_string()).or_insert_with(|| Lock {
            holders: Vec::new(),
            break_requested_by: None,
        });
        match lock.holders.binary_search_by_key(&session, |h| h.session) {
            Ok(i) => lock.holders[i] = holder,
            Err(i) => lock.holders.insert(i, holder),
        }
        Ok(Response::Lock(self.last_token))
    }

    pub(super) fn release(&mut self, session: SessionId, key: &str) -> Response {
        if let Some(lock) = self.locks.get_mut(key) {
            lock.holders.retain(|h| h.session != session);
            if lock.holders.is_empty() {
                self.locks.remove(key);
            }
        }
        Response::Ok
    }

    pub(super) fn request_break(&mut self, key: &str, requester: NodeId) -> OpResult {
        let lock = self.locks.get_mut(key).ok_or(MetaError::NotFound)?;
        lock.break_requested_by = Some(requester);
        Ok(Response::Ok)
    }
}
