//! Nodes, sessions (leases) and block reservations.
//!
//! A session belongs to one node and lives until it is closed, replaced by a newer
//! session of the same node, its node is removed, or a `Tick` finds
//! `expires_at_ms < now`. Ending a session releases its locks and returns its reserved
//! ranges to the free pool. Session ids increase and are never reused. A node record's
//! `session` always names that node's live session, if it has one.

use csv_core::meta::{
    BlockRange, MetaError, NodeId, NodeRecord, PathStatus, SessionId, SessionInfo,
};

use super::alloc::RangeSet;
use super::{OpResult, Session, VolumeState};
use crate::types::Response;

impl VolumeState {
    fn node_session(&self, node: NodeId) -> Option<SessionId> {
        self.sessions
            .values()
            .find(|s| s.info.node == node)
            .map(|s| s.info.id)
    }

    pub(super) fn register_node(
        &mut self,
        node: NodeId,
        rpc_addr: &str,
        nbd_addr: &str,
        mount: &str,
    ) -> OpResult {
        if node == 0 {
            return Err(MetaError::Invalid("node id 0 is reserved".into()));
        }
        let session = self.node_session(node);
        let now = self.now_ms;
        let rec = self.nodes.entry(node).or_insert_with(|| NodeRecord {
            id: node,
            rpc_addr: String::new(),
            nbd_addr: String::new(),
            mount: String::new(),
            path: PathStatus {
                since_ms: now,
                ..PathStatus::default()
            },
            session,
            last_heartbeat_ms: now,
        });
        rec.rpc_addr = rpc_addr.to_string();
        rec.nbd_addr = nbd_addr.to_string();
        rec.mount = mount.to_string();
        Ok(Response::Ok)
    }

    pub(super) fn remove_node(&mut self, node: NodeId) -> OpResult {
        let had_record = self.nodes.remove(&node).is_some();
        let session = self.node_session(node);
        if let Some(s) = session {
            self.end_session(s);
        }
        if had_record || session.is_some() {
            Ok(Response::Ok)
        } else {
            Err(MetaError::NotFound)
        }
    }

    pub(super) fn set_path_status(&mut self, node: NodeId, status: &PathStatus) -> OpResult {
        let rec = self.nodes.get_mut(&node).ok_or(MetaError::NotFound)?;
        rec.path = status.clone();
        Ok(Response::Ok)
    }

    pub(super) fn open_session(&mut self, node: NodeId, ttl_ms: u64) -> OpResult {
        if node == 0 {
            return Err(MetaError::Invalid("node id 0 is reserved".into()));
        }
        if ttl_ms == 0 {
            return Err(MetaError::Invalid("session ttl must be positive".into()));
        }
        if let Some(old) = self.node_session(node) {
            self.end_session(old);
        }
        self.next_session = self.next_session.max(1);
        let id = self.next_session;
        self.next_session += 1;
        let info = SessionInfo {
            id,
            node,
            ttl_ms,
            expires_at_ms: self.now_ms.saturating_add(ttl_ms),
        };
        self.sessions.insert(
            id,
            Session {
                info,
                reserved: RangeSet::default(),
            },
        );
        if let Some(rec) = self.nodes.get_mut(&node) {
            rec.session = Some(id);
            rec.last_heartbeat_ms = self.now_ms;
        }
        Ok(Response::Session(id))
    }

    pub(super) fn live_session(&self, id: SessionId) -> Result<&Session, MetaError> {
        self.sessions.get(&id).ok_or(MetaError::SessionExpired(id))
    }

    pub(super) fn keep_alive(&mut self, id: SessionId) -> OpResult {
        let now = self.now_ms;
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(MetaError::SessionExpired(id))?;
        s.info.expires_at_ms = now.saturating_add(s.info.ttl_ms);
        let node = s.info.node;
        if let Some(rec) = self.nodes.get_mut(&node) {
            rec.last_heartbeat_ms = now;
        }
        Ok(Response::Ok)
    }

    pub(super) fn close_session_op(&mut self, id: SessionId) -> OpResult {
        self.live_session(id)?;
        self.end_session(id);
        Ok(Response::Ok)
    }

    /// Ends a session: its locks are released, its reservations go back to the pool.
    fn end_session(&mut self, id: SessionId) {
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        for r in s.reserved.iter() {
            self.free.insert(r.start, r.len);
        }
        self.locks.retain(|_, l| {
            l.holders.retain(|h| h.session != id);
            !l.holders.is_empty()
        });
        if let Some(rec) = self.nodes.get_mut(&s.info.node)
            && rec.session == Some(id)
        {
            rec.session = None;
        }
    }

    pub(super) fn tick(&mut self) -> Response {
        let now = self.now_ms;
        let expired: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| s.info.expires_at_ms < now)
            .map(|s| s.info.id)
            .collect();
        for &id in &expired {
            self.end_session(id);
        }
        Response::Expired(expired)
    }

    pub(super) fn extend_sessions(&mut self) -> Response {
        let now = self.now_ms;
        for s in self.sessions.values_mut() {
            let floor = now.saturating_add(s.info.ttl_ms);
            s.info.expires_at_ms = s.info.expires_at_ms.max(floor);
        }
        Response::Ok
    }

    pub(super) fn reserve(&mut self, session: SessionId, blocks: u64) -> OpResult {
        self.vol()?;
        self.live_session(session)?;
        if blocks == 0 {
            return Err(MetaError::Invalid("reserve of 0 blocks".into()));
        }
        let taken = self.free.take(blocks);
        if taken.is_empty() {
            return Err(MetaError::NoSpace);
        }
        if let Some(s) = self.sessions.get_mut(&session) {
            for r in &taken {
                s.reserved.insert(r.start, r.len);
            }
        }
        Ok(Response::Reserved(taken))
    }

    pub(super) fn unreserve(&mut self, session: SessionId, ranges: &[BlockRange]) -> OpResult {
        self.vol()?;
        let s = self.live_session(session)?;
        let mut sorted = ranges.to_vec();
        sorted.sort();
        for (i, r) in sorted.iter().enumerate() {
            if r.len == 0 || r.start.checked_add(r.len).is_none() {
                return Err(MetaError::Invalid("empty or overflowing range".into()));
            }
            if i > 0 && sorted[i - 1].end() > r.start {
                return Err(MetaError::Invalid("overlapping ranges".into()));
            }
            if !s.reserved.contains(r.start, r.len) {
                return Err(MetaError::Invalid(format!(
                    "blocks {}+{} are not reserved to session {session}",
                    r.start, r.len
                )));
            }
        }
        if let Some(s) = self.sessions.get_mut(&session) {
            for r in &sorted {
                s.reserved.remove(r.start, r.len);
                self.free.insert(r.start, r.len);
            }
        }
        Ok(Response::Ok)
    }
}
