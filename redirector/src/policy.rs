//! The per-node path policy: where this node's block I/O goes (its own SAN path, a peer over the
//! LAN, or a queue), as a sans-IO state machine.
//!
//! The I/O loop feeds [`Event`]s with the current time (`now`, milliseconds on a monotonic clock the
//! caller owns) into [`Policy::handle`] and carries out the [`Command`]s it returns, in order. It asks
//! [`Policy::route`] where each new I/O goes and calls `handle(now, Event::Tick)` no later than
//! [`Policy::next_deadline`]. Nothing here reads a clock, sleeps or touches a socket.
//!
//! States ([`Mode`]): `Direct`, `Redirected { peer, reason }`, `Paused { reason, since }`.
//! The policy keeps facts (is the path known bad and why, since when probes have succeeded, the
//! peers' health and load, the user's maintenance request) and after every event derives the mode
//! from them, so the rules below hold after every event, whatever the order:
//! - never `Direct` while the path is known bad (a failure with no successful probe since);
//! - a peer is used only while it is known, reported healthy and has not failed within
//!   `peer_retry_ms`; among usable peers the lowest load wins, and the peer in use is kept while it
//!   stays usable (no churn on load changes);
//! - failback from `Redirected` to `Direct` happens only after probes have succeeded for the required
//!   healthy time (hysteresis). That time starts at `failback_healthy_ms`, doubles (capped at
//!   `failback_max_ms`) whenever the path fails within `flap_window_ms` of a failback, and halves
//!   back towards the base for every `flap_decay_ms` spent direct;
//! - `Paused` only when the path is bad and no peer is usable; a probe success while paused resumes
//!   `Direct` at once (there is nothing better to wait on);
//! - queued I/O is failed ([`Command::FailQueued`]) only after `pause_bound_ms` in `Paused`, and
//!   while still paused past the bound new I/O fails fast ([`Route::Fail`]);
//! - a maintenance redirect ([`Event::UserRedirect`]) is honoured only while a peer is usable;
//!   without one the node stays direct, because nothing may fail while a path is healthy;
//! - the published [`PathStatus`] has a reason exactly when the state is not `Direct`.
//!
//! An I/O that timed out (direct or on a peer) has an unknown outcome; the policy answers with
//! [`Command::ResolveUnknown`] so the loop hands it to the ghost ledger before re-issuing it.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use csv_core::lun::LunError;
use csv_core::meta::{NodeId, PathState, PathStatus};
use serde::{Deserialize, Serialize};

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;
/// The I/O loop's id for one I/O request.
pub type OpId = u64;

/// Tunables of the path policy. All durations are milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// This many path I/O errors within `error_window_ms` mark the path bad.
    pub error_threshold: u32,
    pub error_window_ms: u64,
    /// The I/O loop declares a direct or peer I/O timed out after this long (the policy does not
    /// track in-flight I/O; the loop reports [`Event::IoTimedOut`] / [`Event::PeerTimedOut`]).
    pub io_timeout_ms: u64,
    /// Delay between probes of a bad path.
    pub probe_interval_ms: u64,
    /// Base time probes must succeed before failing back from a peer to the path.
    pub failback_healthy_ms: u64,
    /// Cap of the damped failback time.
    pub failback_max_ms: u64,
    /// A path failure this soon after a failback counts as a flap (doubles the failback time).
    pub flap_window_ms: u64,
    /// Each period this long spent direct halves the damped failback time (down to the base).
    pub flap_decay_ms: u64,
    /// How long I/O may stay queued in `Paused` before it fails with EIO (APD timeout).
    pub pause_bound_ms: u64,
    /// A peer that failed is skipped for this long.
    pub peer_retry_ms: u64,
}

impl Default for PolicyConfig {
    /// Defaults sized for reliability goal G4 (p99 failover stall <= 5 s): a hung I/O is detected
    /// in 2 s; the pause bound stays under the Linux block layer's 30 s request timeout so the
    /// consumer sees a clean EIO rather than a disconnect.
    fn default() -> Self {
        PolicyConfig {
            error_threshold: 3,
            error_window_ms: 10_000,
            io_timeout_ms: 2_000,
            probe_interval_ms: 1_000,
            failback_healthy_ms: 10_000,
            failback_max_ms: 300_000,
            flap_window_ms: 60_000,
            flap_decay_ms: 300_000,
            pause_bound_ms: 25_000,
            peer_retry_ms: 5_000,
        }
    }
}

/// What the policy refused to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid path policy setting {field}: {why}")]
    InvalidConfig {
        field: &'static str,
        why: &'static str,
    },
}

impl PolicyConfig {
    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |field, why| Err(PolicyError::InvalidConfig { field, why });
        if self.error_threshold == 0 {
            return bad("error_threshold", "must be at least 1");
        }
        for (field, v) in [
            ("error_window_ms", self.error_window_ms),
            ("io_timeout_ms", self.io_timeout_ms),
            ("probe_interval_ms", self.probe_interval_ms),
            ("failback_healthy_ms", self.failback_healthy_ms),
            ("flap_decay_ms", self.flap_decay_ms),
            ("pause_bound_ms", self.pause_bound_ms),
        ] {
            if v == 0 {
                return bad(field, "must be greater than 0");
            }
        }
        if self.failback_max_ms < self.failback_healthy_ms {
            return bad("failback_max_ms", "must be at least failback_healthy_ms");
        }
        Ok(())
    }
}

/// Why the node is not on its direct path. Displayed as `Get-ClusterSharedVolumeState` would.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// The path is unreachable, or a probe failed.
    NoDiskConnectivity,
    /// An I/O on the path timed out.
    PathHung,
    /// Too many I/O errors on the path within the error window.
    PathIoErrors,
    /// An operator asked for redirected access (maintenance).
    UserRequest,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::NoDiskConnectivity => "no disk connectivity",
            Reason::PathHung => "path hung (I/O timed out)",
            Reason::PathIoErrors => "path I/O errors",
            Reason::UserRequest => "user request",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reason text published while paused.
pub const NO_HEALTHY_PEER: &str = "no healthy peer";

/// Where this node's I/O goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Redirected {
        peer: NodeId,
        reason: Reason,
    },
    /// No path and no peer: new I/O is queued. `since` is when the pause began.
    Paused {
        reason: Reason,
        since: Millis,
    },
}

/// The kind of a path failure reported by a completed I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathFault {
    /// The path cannot be reached at all (connection refused or closed): bad at once.
    Unreachable,
    /// The path answered with an I/O error: counts towards the error threshold.
    Io,
}

/// Through what an I/O with unknown outcome was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Direct,
    Peer(NodeId),
}

/// Something that happened, reported by the I/O loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A direct I/O completed successfully.
    IoOk,
    /// A direct I/O failed because of the path (see [`Event::from_lun_error`]).
    IoFailed { fault: PathFault },
    /// A direct I/O did not complete within `io_timeout_ms`; its outcome is unknown.
    IoTimedOut { op: OpId },
    /// A probe of the direct path succeeded.
    ProbeOk,
    /// A probe of the direct path failed or timed out.
    ProbeFailed,
    /// A peer appeared or its health or load (I/O in flight) changed.
    PeerUpdate {
        peer: NodeId,
        healthy: bool,
        load: u32,
    },
    /// A peer left the cluster.
    PeerRemoved { peer: NodeId },
    /// A redirected request failed on the peer (connection error, path error, busy).
    PeerFailed { peer: NodeId },
    /// A redirected request got no answer within `io_timeout_ms`; its outcome is unknown.
    PeerTimedOut { peer: NodeId, op: OpId },
    /// The operator asks for redirected access (maintenance).
    UserRedirect,
    /// The operator withdraws the maintenance request.
    UserDirect,
    /// Time passed.
    Tick,
}

impl Event {
    /// The event a failed direct I/O stands for, or `None` when the error is the request's own
    /// (out of range, misaligned, fenced) and says nothing about the path.
    pub fn from_lun_error(op: OpId, err: &LunError) -> Option<Event> {
        match err {
            LunError::Timeout { .. } => Some(Event::IoTimedOut { op }),
            LunError::PathUnreachable { .. } | LunError::Closed => Some(Event::IoFailed {
                fault: PathFault::Unreachable,
            }),
            LunError::Io { .. } | LunError::Target { .. } => Some(Event::IoFailed {
                fault: PathFault::Io,
            }),
            LunError::OutOfRange { .. } | LunError::Misaligned { .. } | LunError::Fenced { .. } => {
                None
            }
        }
    }
}

/// What the I/O loop must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send new I/O (and any queued I/O) on the direct path.
    UseDirect,
    /// Send new I/O (and any queued I/O) to this peer.
    UsePeer(NodeId),
    /// Queue new I/O until another command says where it goes.
    Pause,
    /// Fail every queued I/O with EIO (the pause outlasted `pause_bound_ms`).
    FailQueued,
    /// Probe the direct path; report [`Event::ProbeOk`] or [`Event::ProbeFailed`] (a probe that
    /// does not answer within `io_timeout_ms` is a failure).
    StartProbe,
    /// Publish this node's path state (metadata service, `csvctl status`).
    PublishStatus(PathStatus),
    /// `op`'s outcome is unknown on `via`: register it with the ghost ledger (which fences it and
    /// says how to re-issue it) before sending it anywhere else.
    ResolveUnknown { op: OpId, via: Via },
}

/// Where a new I/O goes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Direct,
    Peer(NodeId),
    /// Hold it until a command says where it goes.
    Queue,
    /// Fail it with EIO at once (paused past the bound).
    Fail,
}

#[derive(Debug, Clone)]
struct PeerInfo {
    healthy: bool,
    load: u32,
    failed_at: Option<Millis>,
}

/// The path policy of one node. See the module docs.
#[derive(Debug, Clone)]
pub struct Policy {
    cfg: PolicyConfig,
    now: Millis,
    mode: Mode,
    /// Paused past the bound: queued I/O was failed and new I/O fails fast.
    failing: bool,
    /// `Some(reason)` while the path is known bad or not yet trusted again.
    path_bad: Option<Reason>,
    /// Since when probes have succeeded without a failure in between (only while `path_bad`).
    healthy_since: Option<Millis>,
    /// Times of recent path I/O errors while the path is good.
    errors: VecDeque<Millis>,
    user_redirect: bool,
    peers: BTreeMap<NodeId, PeerInfo>,
    /// The current (damped) failback time.
    required_healthy_ms: u64,
    /// When the path last became trusted again (for flap detection).
    last_failback: Option<Millis>,
    /// Start of the current decay period (while direct).
    decay_anchor: Millis,
    probe_in_flight: bool,
    next_probe_at: Option<Millis>,
    status: PathStatus,
}

impl Policy {
    /// A policy for a node that starts direct with no known peers.
    pub fn new(cfg: PolicyConfig, now: Millis) -> Result<Self, PolicyError> {
        cfg.validate()?;
        Ok(Policy {
            required_healthy_ms: cfg.failback_healthy_ms,
            cfg,
            now,
            mode: Mode::Direct,
            failing: false,
            path_bad: None,
            healthy_since: None,
            errors: VecDeque::new(),
            user_redirect: false,
            peers: BTreeMap::new(),
            last_failback: None,
            decay_anchor: now,
            probe_in_flight: false,
            next_probe_at: None,
            status: PathStatus {
                since_ms: now,
                ..PathStatus::default()
            },
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The status last published (also right after `new`).
    pub fn status(&self) -> &PathStatus {
        &self.status
    }

    /// How long probes must currently succeed before failback (damped by flapping).
    pub fn required_healthy_ms(&self) -> u64 {
        self.required_healthy_ms
    }

    /// Where a new I/O goes.
    pub fn route(&self) -> Route {
        match self.mode {
            Mode::Direct => Route::Direct,
            Mode::Redirected { peer, .. } => Route::Peer(peer),
            Mode::Paused { .. } if self.failing => Route::Fail,
            Mode::Paused { .. } => Route::Queue,
        }
    }

    /// The latest time at which the loop must deliver [`Event::Tick`] for timers to fire on time
    /// (probe due, failback, pause bound, a peer's retry delay ending, flap decay).
    pub fn next_deadline(&self) -> Option<Millis> {
        let mut d: Option<Millis> = None;
        let mut at = |t: Millis| d = Some(d.map_or(t, |x| x.min(t)));
        if self.path_bad.is_some() {
            if let (false, Some(t)) = (self.probe_in_flight, self.next_probe_at) {
                at(t);
            }
            if let Some(t) = self.healthy_since {
                at(t.saturating_add(self.required_healthy_ms));
            }
        }
        if let (Mode::Paused { since, .. }, false) = (self.mode, self.failing) {
            at(since.saturating_add(self.cfg.pause_bound_ms));
        }
        for p in self.peers.values() {
            if let Some(f) = p.failed_at {
                let t = f.saturating_add(self.cfg.peer_retry_ms);
                if t > self.now {
                    at(t);
                }
            }
        }
        if self.mode == Mode::Direct && self.required_healthy_ms > self.cfg.failback_healthy_ms {
            at(self.decay_anchor.saturating_add(self.cfg.flap_decay_ms));
        }
        d
    }

    /// Applies one event at time `now` and returns what the loop must do. A `now` older than one
    /// already seen is treated as the newest seen (time never runs backwards here).
    pub fn handle(&mut self, now: Millis, event: Event) -> Vec<Command> {
        self.now = self.now.max(now);
        let now = self.now;
        let mut out = Vec::new();
        match event {
            // Success on the direct path says nothing new: a bad path is trusted again only
            // through probes (a straggler completing on a hung path proves little).
            Event::IoOk | Event::Tick => {}
            Event::IoFailed {
                fault: PathFault::Unreachable,
            } => self.mark_bad(now, Reason::NoDiskConnectivity),
            Event::IoFailed {
                fault: PathFault::Io,
            } => self.count_error(now),
            Event::IoTimedOut { op } => {
                out.push(Command::ResolveUnknown {
                    op,
                    via: Via::Direct,
                });
                self.mark_bad(now, Reason::PathHung);
            }
            Event::ProbeOk => {
                self.probe_done(now);
                if self.path_bad.is_some() {
                    self.healthy_since.get_or_insert(now);
                }
            }
            Event::ProbeFailed => {
                self.probe_done(now);
                self.mark_bad(now, Reason::NoDiskConnectivity);
            }
            Event::PeerUpdate {
                peer,
                healthy,
                load,
            } => {
                let p = self.peers.entry(peer).or_insert(PeerInfo {
                    healthy,
                    load,
                    failed_at: None,
                });
                p.healthy = healthy;
                p.load = load;
            }
            Event::PeerRemoved { peer } => {
                self.peers.remove(&peer);
            }
            Event::PeerFailed { peer } => self.peer_failed(now, peer),
            Event::PeerTimedOut { peer, op } => {
                out.push(Command::ResolveUnknown {
                    op,
                    via: Via::Peer(peer),
                });
                self.peer_failed(now, peer);
            }
            Event::UserRedirect => self.user_redirect = true,
            Event::UserDirect => self.user_redirect = false,
        }
        self.reconcile(now, &mut out);
        out
    }

    fn probe_done(&mut self, now: Millis) {
        self.probe_in_flight = false;
        self.next_probe_at = Some(now.saturating_add(self.cfg.probe_interval_ms));
    }

    fn peer_failed(&mut self, now: Millis, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.failed_at = Some(now);
        }
    }

    fn count_error(&mut self, now: Millis) {
        if self.path_bad.is_some() {
            self.healthy_since = None;
            return;
        }
        self.errors.push_back(now);
        while self
            .errors
            .front()
            .is_some_and(|&t| now.saturating_sub(t) >= self.cfg.error_window_ms)
        {
            self.errors.pop_front();
        }
        if self.errors.len() >= self.cfg.error_threshold as usize {
            self.mark_bad(now, Reason::PathIoErrors);
        }
    }

    /// Records failure evidence: the path is bad (with the newest reason) and not recovering.
    fn mark_bad(&mut self, now: Millis, reason: Reason) {
        if self.path_bad.is_none() {
            self.errors.clear();
            if let Some(t) = self.last_failback.take()
                && now.saturating_sub(t) <= self.cfg.flap_window_ms
            {
                self.required_healthy_ms = self
                    .required_healthy_ms
                    .saturating_mul(2)
                    .min(self.cfg.failback_max_ms);
            }
            if !self.probe_in_flight {
                self.next_probe_at = Some(now.saturating_add(self.cfg.probe_interval_ms));
            }
        }
        self.path_bad = Some(reason);
        self.healthy_since = None;
    }

    fn peer_usable(&self, peer: NodeId, now: Millis) -> bool {
        self.peers.get(&peer).is_some_and(|p| {
            p.healthy
                && p.failed_at
                    .is_none_or(|f| now.saturating_sub(f) >= self.cfg.peer_retry_ms)
        })
    }

    /// The peer to use now: the current one while usable, else the usable one with the lowest
    /// load (ties: lowest id).
    fn pick_peer(&self, now: Millis) -> Option<NodeId> {
        if let Mode::Redirected { peer, .. } = self.mode
            && self.peer_usable(peer, now)
        {
            return Some(peer);
        }
        self.peers
            .iter()
            .filter(|(id, _)| self.peer_usable(**id, now))
            .min_by_key(|(id, p)| (p.load, **id))
            .map(|(id, _)| *id)
    }

    /// Derives the mode from the facts and emits the commands for any change.
    fn reconcile(&mut self, now: Millis, out: &mut Vec<Command>) {
        let peer = self.pick_peer(now);
        if self.path_bad.is_some()
            && let Some(t) = self.healthy_since
        {
            // Hysteresis applies only when a peer carries the I/O meanwhile.
            if now.saturating_sub(t) >= self.required_healthy_ms || peer.is_none() {
                self.path_bad = None;
                self.healthy_since = None;
                self.next_probe_at = None;
                self.last_failback = Some(now);
            }
        }
        let desired = match (self.path_bad, self.user_redirect, peer) {
            (None, false, _) | (None, true, None) => Mode::Direct,
            (bad, _, Some(peer)) => Mode::Redirected {
                peer,
                reason: bad.unwrap_or(Reason::UserRequest),
            },
            (Some(reason), _, None) => Mode::Paused {
                reason,
                since: match self.mode {
                    Mode::Paused { since, .. } => since,
                    _ => now,
                },
            },
        };
        match (self.mode, desired) {
            (Mode::Direct, Mode::Direct) | (Mode::Paused { .. }, Mode::Paused { .. }) => {}
            (Mode::Redirected { peer: a, .. }, Mode::Redirected { peer: b, .. }) if a == b => {}
            (_, Mode::Direct) => {
                out.push(Command::UseDirect);
                self.decay_anchor = now;
            }
            (_, Mode::Redirected { peer, .. }) => out.push(Command::UsePeer(peer)),
            (_, Mode::Paused { .. }) => out.push(Command::Pause),
        }
        if !matches!(desired, Mode::Paused { .. }) {
            self.failing = false;
        }
        self.mode = desired;

        if let (Mode::Paused { since, .. }, false) = (self.mode, self.failing)
            && now.saturating_sub(since) >= self.cfg.pause_bound_ms
        {
            self.failing = true;
            out.push(Command::FailQueued);
        }
        if self.path_bad.is_some()
            && !self.probe_in_flight
            && self.next_probe_at.is_some_and(|t| now >= t)
        {
            self.probe_in_flight = true;
            out.push(Command::StartProbe);
        }
        if self.mode == Mode::Direct {
            while self.required_healthy_ms > self.cfg.failback_healthy_ms
                && now.saturating_sub(self.decay_anchor) >= self.cfg.flap_decay_ms
            {
                self.required_healthy_ms =
                    (self.required_healthy_ms / 2).max(self.cfg.failback_healthy_ms);
                self.decay_anchor = self.decay_anchor.saturating_add(self.cfg.flap_decay_ms);
            }
        }
        let (state, reason, peer) = match self.mode {
            Mode::Direct => (PathState::Direct, None, None),
            Mode::Redirected { peer, reason } => {
                (PathState::Redirected, Some(reason.to_string()), Some(peer))
            }
            Mode::Paused { reason, .. } => {
                let fail = if self.failing {
                    "; queued I/O failed"
                } else {
                    ""
                };
                let text = format!("{NO_HEALTHY_PEER} ({reason}){fail}");
                (PathState::Paused, Some(text), None)
            }
        };
        if (state, &reason, peer) != (self.status.state, &self.status.reason, self.status.peer) {
            self.status = PathStatus {
                state,
                reason,
                since_ms: now,
                peer,
            };
            out.push(Command::PublishStatus(self.status.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            error_threshold: 3,
            error_window_ms: 5_000,
            io_timeout_ms: 1_000,
            probe_interval_ms: 1_000,
            failback_healthy_ms: 5_000,
            failback_max_ms: 40_000,
            flap_window_ms: 20_000,
            flap_decay_ms: 30_000,
            pause_bound_ms: 10_000,
            peer_retry_ms: 3_000,
        }
    }

    fn peer(peer: NodeId, healthy: bool, load: u32) -> Event {
        Event::PeerUpdate {
            peer,
            healthy,
            load,
        }
    }

    const UNREACHABLE: Event = Event::IoFailed {
        fault: PathFault::Unreachable,
    };
    const IO_ERR: Event = Event::IoFailed {
        fault: PathFault::Io,
    };

    /// A short text for a mode, used by the (state, event) table.
    fn code(p: &Policy) -> String {
        let r = |r: Reason| match r {
            Reason::NoDiskConnectivity => "conn",
            Reason::PathHung => "hung",
            Reason::PathIoErrors => "errs",
            Reason::UserRequest => "user",
        };
        match p.mode() {
            Mode::Direct => "D".into(),
            Mode::Redirected { peer, reason } => format!("R{peer} {}", r(reason)),
            Mode::Paused { reason, .. } if p.route() == Route::Fail => format!("PF {}", r(reason)),
            Mode::Paused { reason, .. } => format!("P {}", r(reason)),
        }
    }

    /// The published status always agrees with the mode, with a reason exactly when not direct.
    fn check_status(p: &Policy) {
        let s = p.status();
        match p.mode() {
            Mode::Direct => {
                assert_eq!(
                    (s.state, &s.reason, s.peer),
                    (PathState::Direct, &None, None)
                )
            }
            Mode::Redirected { peer, reason } => {
                assert_eq!(s.state, PathState::Redirected);
                assert_eq!(s.peer, Some(peer));
                assert_eq!(s.reason.as_deref(), Some(reason.as_str()));
            }
            Mode::Paused { .. } => {
                assert_eq!(s.state, PathState::Paused);
                assert_eq!(s.peer, None);
                assert!(s.reason.as_deref().unwrap().starts_with(NO_HEALTHY_PEER));
            }
        }
    }

    /// Fixtures: (name, policy, the time it was built at).
    fn fixtures() -> Vec<(&'static str, Policy, Millis)> {
        let with_peers = || {
            let mut p = Policy::new(cfg(), 0).unwrap();
            p.handle(0, peer(1, true, 5));
            p.handle(0, peer(2, true, 1));
            p
        };
        let direct_peers = with_peers();
        let direct_alone = Policy::new(cfg(), 0).unwrap();
        let mut redirected_bad = with_peers();
        redirected_bad.handle(1_000, Event::IoTimedOut { op: 1 });
        let mut recovering = redirected_bad.clone();
        assert_eq!(recovering.handle(2_000, Event::Tick), [Command::StartProbe]);
        recovering.handle(2_100, Event::ProbeOk);
        let mut redirected_user = with_peers();
        redirected_user.handle(500, Event::UserRedirect);
        let mut paused = Policy::new(cfg(), 0).unwrap();
        paused.handle(1_000, UNREACHABLE);
        let mut failing = paused.clone();
        assert!(
            failing
                .handle(11_000, Event::Tick)
                .contains(&Command::FailQueued)
        );
        vec![
            ("direct with peers", direct_peers, 0),
            ("direct alone", direct_alone, 0),
            ("redirected, path bad", redirected_bad, 1_000),
            ("redirected, path recovering", recovering, 2_100),
            ("redirected by user", redirected_user, 500),
            ("paused", paused, 1_000),
            ("paused past the bound", failing, 11_000),
        ]
    }

    /// Events of the table; ticks are relative to the fixture's time.
    fn table_events() -> Vec<(&'static str, Event, Millis)> {
        vec![
            ("io ok", Event::IoOk, 100),
            ("one io error", IO_ERR, 100),
            ("io unreachable", UNREACHABLE, 100),
            ("io timed out", Event::IoTimedOut { op: 9 }, 100),
            ("probe ok", Event::ProbeOk, 100),
            ("probe failed", Event::ProbeFailed, 100),
            ("peer 2 unhealthy", peer(2, false, 1), 100),
            ("peer 3 appears idle", peer(3, true, 0), 100),
            ("peer 2 removed", Event::PeerRemoved { peer: 2 }, 100),
            ("peer 2 failed", Event::PeerFailed { peer: 2 }, 100),
            (
                "peer 2 timed out",
                Event::PeerTimedOut { peer: 2, op: 9 },
                100,
            ),
            ("user redirect", Event::UserRedirect, 100),
            ("user direct", Event::UserDirect, 100),
            ("short tick", Event::Tick, 100),
            ("long tick", Event::Tick, 60_000),
        ]
    }

    #[test]
    fn every_state_event_pair_goes_where_the_table_says() {
        #[rustfmt::skip]
        let expect: [[&str; 15]; 7] = [
            // io ok, 1 err, unreach, timeout, probe ok, probe fail, p2 sick, p3 new, p2 gone, p2 failed, p2 timeout, user redir, user direct, tick, long tick
            ["D", "D", "R2 conn", "R2 hung", "D", "R2 conn", "D", "D", "D", "D", "D", "R2 user", "D", "D", "D"],
            ["D", "D", "P conn", "P hung", "D", "P conn", "D", "D", "D", "D", "D", "D", "D", "D", "D"],
            ["R2 hung", "R2 hung", "R2 conn", "R2 hung", "R2 hung", "R2 conn", "R1 hung", "R2 hung", "R1 hung", "R1 hung", "R1 hung", "R2 hung", "R2 hung", "R2 hung", "R2 hung"],
            ["R2 hung", "R2 hung", "R2 conn", "R2 hung", "R2 hung", "R2 conn", "R1 hung", "R2 hung", "R1 hung", "R1 hung", "R1 hung", "R2 hung", "R2 hung", "R2 hung", "D"],
            ["R2 user", "R2 user", "R2 conn", "R2 hung", "R2 user", "R2 conn", "R1 user", "R2 user", "R1 user", "R1 user", "R1 user", "R2 user", "D", "R2 user", "R2 user"],
            ["P conn", "P conn", "P conn", "P hung", "D", "P conn", "P conn", "R3 conn", "P conn", "P conn", "P conn", "P conn", "P conn", "P conn", "PF conn"],
            ["PF conn", "PF conn", "PF conn", "PF hung", "D", "PF conn", "PF conn", "R3 conn", "PF conn", "PF conn", "PF conn", "PF conn", "PF conn", "PF conn", "PF conn"],
        ];
        for (fi, (fname, fixture, t0)) in fixtures().into_iter().enumerate() {
            for (ei, (ename, event, dt)) in table_events().into_iter().enumerate() {
                let mut p = fixture.clone();
                let before = p.mode();
                let was_failing = p.route() == Route::Fail;
                let cmds = p.handle(t0 + dt, event);
                let ctx = format!("state {fname:?}, event {ename:?}, commands {cmds:?}");
                assert_eq!(code(&p), expect[fi][ei], "{ctx}");
                check_status(&p);
                // The mode command matches the new mode, and only a change emits one.
                let mode_cmds: Vec<_> = cmds
                    .iter()
                    .filter(|c| {
                        matches!(c, Command::UseDirect | Command::UsePeer(_) | Command::Pause)
                    })
                    .collect();
                let changed = match (before, p.mode()) {
                    (Mode::Direct, Mode::Direct) | (Mode::Paused { .. }, Mode::Paused { .. }) => {
                        false
                    }
                    (Mode::Redirected { peer: a, .. }, Mode::Redirected { peer: b, .. }) => a != b,
                    _ => true,
                };
                let want = match p.mode() {
                    Mode::Direct => Command::UseDirect,
                    Mode::Redirected { peer, .. } => Command::UsePeer(peer),
                    Mode::Paused { .. } => Command::Pause,
                };
                if changed {
                    assert_eq!(mode_cmds, [&want], "{ctx}");
                } else {
                    assert!(mode_cmds.is_empty(), "{ctx}");
                }
                // Status is published exactly when it changed.
                let published = cmds
                    .iter()
                    .filter(|c| matches!(c, Command::PublishStatus(_)))
                    .count();
                let shown = |s: &PathStatus| (s.state, s.reason.clone(), s.peer);
                let changed_status = shown(fixture.status()) != shown(p.status());
                assert_eq!(published, usize::from(changed_status), "{ctx}");
                // Unknown outcomes are always handed to the ghost ledger, first.
                match event {
                    Event::IoTimedOut { op } => assert_eq!(
                        cmds.first(),
                        Some(&Command::ResolveUnknown {
                            op,
                            via: Via::Direct
                        }),
                        "{ctx}"
                    ),
                    Event::PeerTimedOut { peer, op } => assert_eq!(
                        cmds.first(),
                        Some(&Command::ResolveUnknown {
                            op,
                            via: Via::Peer(peer)
                        }),
                        "{ctx}"
                    ),
                    _ => assert!(
                        !cmds
                            .iter()
                            .any(|c| matches!(c, Command::ResolveUnknown { .. })),
                        "{ctx}"
                    ),
                }
                let newly_failing = p.route() == Route::Fail && !was_failing;
                assert_eq!(cmds.contains(&Command::FailQueued), newly_failing, "{ctx}");
            }
        }
    }

    #[test]
    fn errors_mark_the_path_bad_only_at_the_threshold_within_the_window() {
        let mut p = Policy::new(cfg(), 0).unwrap();
        p.handle(0, peer(1, true, 0));
        p.handle(0, IO_ERR);
        p.handle(2_000, IO_ERR);
        assert_eq!(p.mode(), Mode::Direct);
        // The first error left the 5 s window: still two in it.
        p.handle(5_000, IO_ERR);
        assert_eq!(p.mode(), Mode::Direct);
        let cmds = p.handle(5_500, IO_ERR);
        assert_eq!(code(&p), "R1 errs");
        assert_eq!(cmds[0], Command::UsePeer(1));
        assert_eq!(
            p.status().reason.as_deref(),
            Some("path I/O errors"),
            "human reason"
        );
    }

    #[test]
    fn failback_waits_exactly_the_healthy_time_and_an_error_restarts_it() {
        let (_, mut p, _) = fixtures().swap_remove(3); // recovering since 2_100
        assert_eq!(p.next_deadline(), Some(3_100), "the next probe comes first");
        assert_eq!(p.handle(3_100, Event::Tick), [Command::StartProbe]);
        p.handle(3_200, Event::ProbeOk);
        assert_eq!(p.next_deadline(), Some(4_200));
        p.handle(4_200, Event::Tick);
        p.handle(4_300, Event::ProbeOk);
        assert_eq!(p.handle(7_099, Event::Tick), [Command::StartProbe]);
        let cmds = p.handle(7_100, Event::Tick);
        assert_eq!(cmds[0], Command::UseDirect);
        assert_eq!(p.route(), Route::Direct);

        let (_, mut p, _) = fixtures().swap_remove(3);
        p.handle(4_000, IO_ERR);
        p.handle(8_000, Event::Tick); // StartProbe (due at 3_100)
        assert_eq!(code(&p), "R2 hung");
        p.handle(8_500, Event::ProbeOk);
        p.handle(13_499, Event::Tick);
        assert_eq!(code(&p), "R2 hung");
        p.handle(13_500, Event::Tick);
        assert_eq!(code(&p), "D");
    }

    #[test]
    fn a_recovering_path_is_used_at_once_when_no_peer_is_left() {
        let (_, mut p, _) = fixtures().swap_remove(3);
        p.handle(2_200, Event::PeerRemoved { peer: 2 });
        assert_eq!(code(&p), "R1 hung");
        let cmds = p.handle(2_300, Event::PeerFailed { peer: 1 });
        assert_eq!(cmds[0], Command::UseDirect);
    }

    /// Drives one fail -> redirect -> probe ok -> failback cycle and returns the failback time.
    fn cycle(p: &mut Policy, t: Millis) -> Millis {
        p.handle(t, UNREACHABLE);
        assert_ne!(p.mode(), Mode::Direct);
        let probe_at = p.next_deadline().unwrap();
        assert_eq!(p.handle(probe_at, Event::Tick), [Command::StartProbe]);
        p.handle(probe_at, Event::ProbeOk);
        let back = probe_at + p.required_healthy_ms();
        assert!(
            !p.handle(back - 1, Event::Tick)
                .contains(&Command::UseDirect)
        );
        p.handle(back - 1, Event::ProbeOk);
        assert_eq!(p.handle(back, Event::Tick)[0], Command::UseDirect);
        back
    }

    #[test]
    fn flapping_doubles_the_failback_time_up_to_the_cap_and_it_decays_later() {
        let mut p = Policy::new(cfg(), 0).unwrap();
        p.handle(0, peer(1, true, 0));
        let mut t = cycle(&mut p, 1_000);
        assert_eq!(p.required_healthy_ms(), 5_000);
        for want in [10_000, 20_000, 40_000, 40_000] {
            // Failing again within the flap window of the failback counts as a flap.
            t = cycle(&mut p, t + 1_000);
            assert_eq!(p.required_healthy_ms(), want);
        }
        // A failure after the flap window is not a flap.
        t = cycle(&mut p, t + 20_001);
        assert_eq!(p.required_healthy_ms(), 40_000);
        // Each 30 s spent direct halves it, down to the base.
        assert_eq!(p.next_deadline(), Some(t + 30_000));
        p.handle(t + 29_999, Event::Tick);
        assert_eq!(p.required_healthy_ms(), 40_000);
        p.handle(t + 30_000, Event::Tick);
        assert_eq!(p.required_healthy_ms(), 20_000);
        p.handle(t + 120_000, Event::Tick);
        assert_eq!(p.required_healthy_ms(), 5_000);
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn probes_run_one_at_a_time_every_interval_while_the_path_is_bad() {
        let mut p = Policy::new(cfg(), 0).unwrap();
        p.handle(0, peer(1, true, 0));
        p.handle(1_000, UNREACHABLE);
        assert_eq!(p.next_deadline(), Some(2_000));
        assert!(p.handle(1_999, Event::Tick).is_empty());
        assert_eq!(p.handle(2_000, Event::Tick), [Command::StartProbe]);
        assert!(
            p.handle(9_000, Event::Tick).is_empty(),
            "one probe at a time"
        );
        p.handle(9_500, Event::ProbeFailed);
        assert_eq!(p.next_deadline(), Some(10_500));
        assert_eq!(p.handle(10_500, Event::Tick), [Command::StartProbe]);
        p.handle(10_600, Event::ProbeOk);
        // Probing continues while waiting out the healthy time.
        assert_eq!(p.handle(11_600, Event::Tick), [Command::StartProbe]);
        p.handle(11_700, Event::ProbeOk);
        assert_eq!(p.handle(15_600, Event::Tick)[0], Command::UseDirect);
        assert!(
            p.handle(100_000, Event::Tick).is_empty(),
            "no probes while direct"
        );
    }

    #[test]
    fn paused_io_fails_exactly_at_the_bound_once_and_then_fails_fast() {
        let (_, mut p, _) = fixtures().swap_remove(5); // paused since 1_000
        assert_eq!(p.route(), Route::Queue);
        assert_eq!(p.next_deadline(), Some(2_000)); // the first probe comes first
        p.handle(2_000, Event::Tick);
        p.handle(2_100, Event::ProbeFailed);
        assert!(!p.handle(10_999, Event::Tick).contains(&Command::FailQueued));
        let cmds = p.handle(11_000, Event::Tick);
        assert!(cmds.contains(&Command::FailQueued));
        assert!(
            matches!(cmds.last(), Some(Command::PublishStatus(s)) if s.reason.as_deref().unwrap().ends_with("queued I/O failed"))
        );
        assert_eq!(p.route(), Route::Fail);
        assert!(!p.handle(20_000, Event::Tick).contains(&Command::FailQueued));
        // A peer appearing ends the pause; a later pause starts a new bound.
        assert_eq!(p.handle(20_100, peer(4, true, 0))[0], Command::UsePeer(4));
        assert_eq!(p.route(), Route::Peer(4));
        let cmds = p.handle(20_200, Event::PeerTimedOut { peer: 4, op: 3 });
        assert_eq!(cmds[1], Command::Pause);
        assert_eq!(p.route(), Route::Queue);
        assert_eq!(
            p.mode(),
            Mode::Paused {
                reason: Reason::NoDiskConnectivity,
                since: 20_200
            }
        );
        // The failed peer is retried after peer_retry_ms, before the bound.
        assert_eq!(p.next_deadline(), Some(20_200 + 3_000));
        assert_eq!(p.handle(23_200, Event::Tick)[0], Command::UsePeer(4));
    }

    #[test]
    fn peers_are_chosen_by_load_skipping_failed_ones_and_kept_while_usable() {
        let mut p = Policy::new(cfg(), 0).unwrap();
        for (id, load) in [(1, 7), (2, 3), (3, 3), (4, 0)] {
            p.handle(0, peer(id, true, load));
        }
        p.handle(0, peer(4, false, 0));
        p.handle(10, Event::PeerFailed { peer: 2 });
        p.handle(100, Event::IoTimedOut { op: 1 });
        assert_eq!(
            p.route(),
            Route::Peer(3),
            "2 failed recently, 4 unhealthy, 3 < 1"
        );
        p.handle(200, peer(1, true, 0));
        assert_eq!(p.route(), Route::Peer(3), "no churn on load changes");
        p.handle(300, Event::PeerFailed { peer: 3 });
        assert_eq!(p.route(), Route::Peer(1));
        p.handle(3_010, Event::PeerRemoved { peer: 1 });
        assert_eq!(p.route(), Route::Peer(2), "2's retry delay has passed");
        // A failure report about an unknown peer changes nothing.
        assert!(p.handle(3_020, Event::PeerFailed { peer: 99 }).is_empty());
    }

    #[test]
    fn user_redirect_without_peer_stays_direct_until_a_peer_appears() {
        let mut p = Policy::new(cfg(), 0).unwrap();
        assert!(p.handle(0, Event::UserRedirect).is_empty());
        assert_eq!(p.route(), Route::Direct);
        let cmds = p.handle(10, peer(5, true, 0));
        assert_eq!(cmds[0], Command::UsePeer(5));
        assert_eq!(p.status().reason.as_deref(), Some("user request"));
        // The path failing while user-redirected changes only the reason.
        let cmds = p.handle(20, UNREACHABLE);
        assert!(
            matches!(&cmds[..], [Command::PublishStatus(s)] if s.reason.as_deref() == Some("no disk connectivity"))
        );
    }

    #[test]
    fn time_never_runs_backwards() {
        let mut p = Policy::new(cfg(), 0).unwrap();
        p.handle(0, peer(1, true, 0));
        p.handle(10_000, UNREACHABLE);
        p.handle(5_000, Event::Tick); // treated as 10_000
        assert_eq!(p.next_deadline(), Some(11_000));
        assert_eq!(p.status().since_ms, 10_000);
    }

    #[test]
    fn lun_errors_map_to_path_events_only_when_they_are_about_the_path() {
        use std::io;
        let ev = |e: LunError| Event::from_lun_error(4, &e);
        assert_eq!(
            ev(LunError::Timeout { op: "write", ms: 1 }),
            Some(Event::IoTimedOut { op: 4 })
        );
        assert_eq!(ev(LunError::Closed), Some(UNREACHABLE));
        assert_eq!(
            ev(LunError::PathUnreachable { reason: "x".into() }),
            Some(UNREACHABLE)
        );
        let io_err = LunError::Io {
            op: "read",
            offset: 0,
            source: io::Error::other("eio"),
        };
        assert_eq!(ev(io_err), Some(IO_ERR));
        assert_eq!(
            ev(LunError::Target {
                op: "write",
                errno: 5
            }),
            Some(IO_ERR)
        );
        assert_eq!(
            ev(LunError::OutOfRange {
                offset: 0,
                len: 1,
                size: 0
            }),
            None
        );
        assert_eq!(
            ev(LunError::Misaligned {
                offset: 1,
                len: 1,
                align: 512
            }),
            None
        );
        assert_eq!(ev(LunError::Fenced { token: 1 }), None);
    }

    #[test]
    fn invalid_configs_are_refused() {
        let mut c = cfg();
        c.error_threshold = 0;
        assert!(Policy::new(c, 0).is_err());
        let mut c = cfg();
        c.failback_max_ms = 1;
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.pause_bound_ms = 0;
        assert!(c.validate().is_err());
        PolicyConfig::default().validate().unwrap();
    }

    // ---- random event sequences against a shadow of what the policy has been told ----

    #[derive(Debug, Clone)]
    enum Step {
        Advance(u64),
        Ev(Event),
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let peer_id = 1u64..5;
        prop_oneof![
            1 => Just(Event::IoOk),
            1 => Just(IO_ERR),
            1 => Just(UNREACHABLE),
            1 => (0u64..1000).prop_map(|op| Event::IoTimedOut { op }),
            4 => Just(Event::ProbeOk),
            1 => Just(Event::ProbeFailed),
            3 => (peer_id.clone(), any::<bool>(), 0u32..4)
                .prop_map(|(peer, healthy, load)| Event::PeerUpdate { peer, healthy, load }),
            1 => peer_id.clone().prop_map(|peer| Event::PeerRemoved { peer }),
            1 => peer_id.clone().prop_map(|peer| Event::PeerFailed { peer }),
            1 => (peer_id, 0u64..1000).prop_map(|(peer, op)| Event::PeerTimedOut { peer, op }),
            1 => Just(Event::UserRedirect),
            1 => Just(Event::UserDirect),
            3 => Just(Event::Tick),
        ]
    }

    fn arb_steps() -> impl Strategy<Value = Vec<Step>> {
        proptest::collection::vec(
            prop_oneof![
                2 => (0u64..4_000).prop_map(Step::Advance),
                5 => arb_event().prop_map(Step::Ev),
            ],
            1..200,
        )
    }

    /// What the policy has been told, and the conclusions that follow from it alone.
    #[derive(Default)]
    struct Shadow {
        peers: BTreeMap<NodeId, (bool, Option<Millis>)>,
        /// A definitive path failure (unreachable, timeout, failed probe) with no probe ok since.
        known_bad: bool,
        /// Start of the current run of probe successes with no path failure of any kind since.
        ok_run_start: Option<Millis>,
        /// A definitive failure happened since the policy last went direct.
        needs_recovery: bool,
        /// Since that failure, the path has qualified for failback at some step.
        eligible: bool,
        paused_since: Option<Millis>,
    }

    impl Shadow {
        fn usable(&self, peer: NodeId, now: Millis) -> bool {
            self.peers
                .get(&peer)
                .is_some_and(|(h, f)| *h && f.is_none_or(|f| now - f >= cfg().peer_retry_ms))
        }
        fn any_usable(&self, now: Millis) -> bool {
            self.peers.keys().any(|&p| self.usable(p, now))
        }
        fn observe(&mut self, now: Millis, ev: Event) {
            match ev {
                Event::IoFailed {
                    fault: PathFault::Unreachable,
                }
                | Event::IoTimedOut { .. }
                | Event::ProbeFailed => {
                    self.known_bad = true;
                    self.ok_run_start = None;
                    self.needs_recovery = true;
                    self.eligible = false;
                }
                Event::IoFailed {
                    fault: PathFault::Io,
                } => self.ok_run_start = None,
                Event::ProbeOk => {
                    self.known_bad = false;
                    self.ok_run_start.get_or_insert(now);
                }
                Event::PeerUpdate { peer, healthy, .. } => {
                    self.peers.entry(peer).or_insert((healthy, None)).0 = healthy;
                }
                Event::PeerRemoved { peer } => {
                    self.peers.remove(&peer);
                }
                Event::PeerFailed { peer } | Event::PeerTimedOut { peer, .. } => {
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.1 = Some(now);
                    }
                }
                _ => {}
            }
            if let Some(t) = self.ok_run_start
                && (now - t >= cfg().failback_healthy_ms || !self.any_usable(now))
            {
                self.eligible = true;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn random_event_sequences_keep_the_policy_invariants(steps in arb_steps()) {
            let c = cfg();
            let mut p = Policy::new(c.clone(), 0).unwrap();
            let mut sh = Shadow::default();
            let mut now = 0;
            for step in steps {
                let ev = match step {
                    Step::Advance(d) => { now += d; Event::Tick }
                    Step::Ev(e) => e,
                };
                let before = p.mode();
                sh.observe(now, ev);
                let cmds = p.handle(now, ev);
                for cmd in &cmds {
                    match cmd {
                        Command::UsePeer(peer) => {
                            prop_assert!(sh.usable(*peer, now), "used unusable peer {peer} at {now}");
                            sh.paused_since = None;
                        }
                        Command::UseDirect => {
                            prop_assert!(!sh.known_bad, "direct while the path is known bad");
                            prop_assert!(
                                !sh.needs_recovery || sh.eligible,
                                "failback at {now} before the healthy time, from {before:?}"
                            );
                            sh.needs_recovery = false;
                            sh.eligible = false;
                            sh.paused_since = None;
                        }
                        Command::Pause => {
                            prop_assert!(!sh.any_usable(now), "paused with a usable peer");
                            sh.paused_since = Some(now);
                        }
                        Command::FailQueued => {
                            prop_assert!(sh.paused_since.is_some(), "failed queued I/O while not paused");
                            let since = sh.paused_since.unwrap_or_default();
                            prop_assert!(now - since >= c.pause_bound_ms, "failed early");
                            prop_assert!(!sh.any_usable(now), "failed with a usable peer");
                            prop_assert!(sh.ok_run_start.is_none(), "failed with a usable path");
                        }
                        Command::PublishStatus(s) => prop_assert_eq!(s, p.status()),
                        Command::ResolveUnknown { .. } | Command::StartProbe => {}
                    }
                }
                check_status(&p);
                match p.mode() {
                    Mode::Direct => prop_assert!(!sh.known_bad, "direct while known bad"),
                    Mode::Redirected { peer, .. } => prop_assert!(sh.usable(peer, now)),
                    Mode::Paused { .. } => {
                        prop_assert!(!sh.any_usable(now), "paused with a usable peer");
                        prop_assert!(sh.ok_run_start.is_none(), "paused with a usable path");
                    }
                }
                if p.route() == Route::Fail {
                    prop_assert!(now - sh.paused_since.unwrap_or(now) >= c.pause_bound_ms);
                }
            }
        }
    }
}
