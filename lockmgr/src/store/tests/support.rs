//! Test fixtures: a tiny [`StateMachineData`], entry builders, and an in-process Raft network
//! that calls the target node's `Raft` handle directly (openraft's API is itself a channel to
//! the node's core task).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{CommittedLeaderId, Config, Entry, EntryPayload, LogId, Membership, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use crate::store::{LogStore, StateMachineData, StateMachineStore, StoreError, open};
use crate::types::{Command, Op, Raft, RaftNode, Response, TypeConfig};

/// Counts commands and folds their clocks into an order-sensitive digest.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub count: u64,
    pub digest: u64,
}

impl StateMachineData for Tally {
    fn apply(&mut self, cmd: &Command) -> Response {
        self.count += 1;
        self.digest = self.digest.rotate_left(7) ^ cmd.now_ms.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Response::Session(self.count)
    }
}

/// The state after applying `cmd(n)` for every `n` in `ns`, in order.
pub fn tally_of(ns: impl IntoIterator<Item = u64>) -> Tally {
    let mut t = Tally::default();
    for n in ns {
        t.apply(&cmd(n));
    }
    t
}

pub fn cmd(n: u64) -> Command {
    Command {
        now_ms: n,
        op: Op::Tick,
        origin: None,
    }
}

pub fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

pub fn normal(term: u64, index: u64, n: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(cmd(n)),
    }
}

pub fn membership(term: u64, index: u64, voters: &[u64]) -> Entry<TypeConfig> {
    let m = Membership::new(vec![voters.iter().copied().collect()], None);
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(m),
    }
}

/// Opens a store, retrying while a just-shut-down node still holds the files open.
pub async fn open_eventually(dir: &Path) -> (LogStore, StateMachineStore<Tally>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open::<Tally>(dir) {
            Ok(s) => return s,
            Err(StoreError::Open {
                source: redb::DatabaseError::DatabaseAlreadyOpen,
                ..
            }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("cannot reopen the store: {e:?}"),
        }
    }
}

pub fn raft_config() -> Arc<Config> {
    let cfg = Config {
        // Generous: the machine is shared, and a spurious election would only slow tests down
        // (a restarted single voter and `initialize` elect at once, without waiting).
        heartbeat_interval: 250,
        election_timeout_min: 3000,
        election_timeout_max: 6000,
        install_snapshot_timeout: 5000,
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    Arc::new(cfg.validate().unwrap())
}

/// The nodes that are "up": a node outside the map neither sends nor receives.
#[derive(Clone, Default)]
pub struct Router {
    nodes: Arc<Mutex<BTreeMap<u64, Raft>>>,
}

impl Router {
    pub fn add(&self, id: u64, raft: Raft) {
        self.nodes.lock().unwrap().insert(id, raft);
    }

    pub fn remove(&self, id: u64) -> Option<Raft> {
        self.nodes.lock().unwrap().remove(&id)
    }

    fn route(&self, from: u64, to: u64) -> Result<Raft, Unreachable> {
        let nodes = self.nodes.lock().unwrap();
        match (nodes.contains_key(&from), nodes.get(&to)) {
            (true, Some(raft)) => Ok(raft.clone()),
            _ => Err(Unreachable::new(&Down { from, to })),
        }
    }

    pub fn factory(&self, from: u64) -> NetFactory {
        NetFactory {
            router: self.clone(),
            from,
        }
    }

    /// Opens the store in `dir`, starts node `id` on it and connects it.
    pub async fn start(&self, id: u64, dir: &Path) -> (Raft, Arc<RwLock<Tally>>) {
        let (log, sm) = open_eventually(dir).await;
        let state = sm.state();
        let raft = Raft::new(id, raft_config(), self.factory(id), log, sm)
            .await
            .unwrap();
        self.add(id, raft.clone());
        (raft, state)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("node {from} cannot reach node {to}")]
struct Down {
    from: u64,
    to: u64,
}

pub struct NetFactory {
    router: Router,
    from: u64,
}

impl RaftNetworkFactory<TypeConfig> for NetFactory {
    type Network = Conn;

    async fn new_client(&mut self, target: u64, _node: &RaftNode) -> Conn {
        Conn {
            router: self.router.clone(),
            from: self.from,
            target,
        }
    }
}

pub struct Conn {
    router: Router,
    from: u64,
    target: u64,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, RaftNode, RaftError<u64, E>>;

impl Conn {
    fn target(&self) -> Result<Raft, Unreachable> {
        self.router.route(self.from, self.target)
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        let raft = self.target()?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| remote(self.target, e))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        let raft = self.target()?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| remote(self.target, e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        let raft = self.target()?;
        raft.vote(rpc).await.map_err(|e| remote(self.target, e))
    }
}

fn remote<E: std::error::Error>(
    target: u64,
    e: RaftError<u64, E>,
) -> RPCError<u64, RaftNode, RaftError<u64, E>> {
    match e {
        // A node that is shutting down looks like a network failure to its peers.
        RaftError::Fatal(f) => RPCError::Network(NetworkError::new(&f)),
        e => RPCError::RemoteError(RemoteError::new(target, e)),
    }
}
