//! `csvd --config node.toml`: the node configuration, parsed and validated.
//!
//! Every field is documented here and in the README's configuration reference.
//! Unknown keys are refused (a typo must not silently fall back to a default).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id: a unique integer from 1 upwards.
    pub node_id: u64,
    /// Where this node keeps its Raft log and state (created if missing).
    pub data_dir: PathBuf,
    /// The shared LUN: a block device (`/dev/sdX`), a file path, or an NBD target
    /// (`nbd://host:port/export`, `nbd+unix:///export?socket=/path`).
    pub lun: String,
    /// Open a file or block device LUN with O_DIRECT (`true`) or through the page cache
    /// (`false`). Unset: O_DIRECT for a block device or a file on NFS, SMB or 9P (other hosts
    /// write it, and this host's page cache would not see their writes), the page cache for a
    /// local file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lun_direct: Option<bool>,
    /// Where the volume is mounted through FUSE; empty to not mount.
    #[serde(default)]
    pub mountpoint: Option<PathBuf>,
    /// A file holding the cluster secret (at least 16 bytes); all nodes share it.
    pub secret_file: PathBuf,
    /// Create a new cluster with this node as its first member if it has no Raft state.
    /// Exactly one node of a new cluster sets this; it is ignored once the node has state.
    #[serde(default)]
    pub bootstrap: bool,
    /// Cluster RPC addresses of existing members to join through.
    #[serde(default)]
    pub peers: Vec<String>,
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub session: SessionConfig,
    /// The I/O redirector (SAN path failover to peers over the LAN).
    #[serde(default)]
    pub redirector: RedirectorSection,
    #[serde(default)]
    pub nbd: NbdSection,
    /// Log filter (`info`, `debug`, `csvd=debug,openraft=warn`, ...).
    #[serde(default = "default_log")]
    pub log: String,
}

fn default_log() -> String {
    "info,openraft=error".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// The cluster RPC listener (Raft, forwarded metadata writes, redirected I/O).
    pub rpc: SocketAddr,
    /// The address peers dial for RPC (defaults to `rpc`).
    pub advertise_rpc: Option<String>,
    /// The NBD server for VMMs.
    pub nbd: SocketAddr,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            rpc: SocketAddr::from(([127, 0, 0, 1], 7100)),
            advertise_rpc: None,
            nbd: SocketAddr::from(([127, 0, 0, 1], 10809)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat interval; also the AppendEntries timeout (keep it above the
    /// worst fsync latency of the Raft store).
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log behind it) every this many entries.
    pub snapshot_logs: u64,
    /// A voter without a live session for this long is replaced by a healthy learner.
    pub voter_replace_after_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_logs: 5_000,
            voter_replace_after_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Session (lease) TTL: a node that cannot renew for this long loses its locks.
    /// It stops writing ttl/5 before (self-fence).
    pub ttl_ms: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { ttl_ms: 10_000 }
    }
}

/// `[nbd]`: how this node's NBD server answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdSection {
    /// How large READs of cached data go out: `map` (the default), `copy` or `splice` (see
    /// `nbd_backend::ReadPath`; README, "Large reads are sent from a mapping of the LUN").
    pub reads: NbdReads,
    /// The earlier spelling of `reads = "splice"` (kept so that such configs still load).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub splice_reads: bool,
}

impl NbdSection {
    /// The read path the server runs with.
    pub fn read_path(&self) -> nbd_backend::ReadPath {
        if self.splice_reads {
            return nbd_backend::ReadPath::Splice;
        }
        match self.reads {
            NbdReads::Map => nbd_backend::ReadPath::Map,
            NbdReads::Copy => nbd_backend::ReadPath::Copy,
            NbdReads::Splice => nbd_backend::ReadPath::Splice,
        }
    }
}

/// `[nbd] reads`: see [`nbd_backend::ReadPath`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdReads {
    #[default]
    Map,
    Copy,
    Splice,
}

/// `[redirector]`: how this node detects a bad SAN path, redirects its I/O to a peer, and
/// fails back. All durations are milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedirectorSection {
    /// A SAN or redirected request without an answer after this long is timed out: its outcome is
    /// unknown, the path is marked hung and the request is re-issued elsewhere.
    pub io_timeout_ms: u64,
    /// This many SAN I/O errors within `error_window_ms` mark the path bad.
    pub error_threshold: u32,
    pub error_window_ms: u64,
    /// Delay between probes of a bad path.
    pub probe_interval_ms: u64,
    /// Probes must succeed this long before I/O fails back from a peer to the SAN path.
    pub failback_healthy_ms: u64,
    /// Flap damping: a path failing again within `flap_window_ms` of a failback doubles the
    /// healthy time (up to `failback_max_ms`); every `flap_decay_ms` spent direct halves it.
    pub failback_max_ms: u64,
    pub flap_window_ms: u64,
    pub flap_decay_ms: u64,
    /// With no SAN path and no healthy peer, I/O is queued this long, then fails with EIO.
    pub pause_bound_ms: u64,
    /// A peer that failed a redirected request is skipped for this long.
    pub peer_retry_ms: u64,
    /// Memory (MiB) for newest data over writes with unknown outcome (ghost writes); writes over
    /// them stall beyond it until the ghosts resolve.
    pub ghost_budget_mib: u64,
}

impl Default for RedirectorSection {
    fn default() -> Self {
        RedirectorSection {
            io_timeout_ms: 1_000,
            error_threshold: 3,
            error_window_ms: 10_000,
            probe_interval_ms: 500,
            failback_healthy_ms: 10_000,
            failback_max_ms: 300_000,
            flap_window_ms: 60_000,
            flap_decay_ms: 300_000,
            pause_bound_ms: 25_000,
            peer_retry_ms: 2_000,
            ghost_budget_mib: 256,
        }
    }
}

impl RedirectorSection {
    /// The redirector's settings (checked by [`NodeConfig::validate`]). A dead peer's lost
    /// writes are given `session_ttl_ms` to land (see `docs/fencing.md` §4).
    pub fn to_redirector(&self, session_ttl_ms: u64) -> redirector::RedirectorConfig {
        redirector::RedirectorConfig {
            policy: redirector::policy::PolicyConfig {
                error_threshold: self.error_threshold,
                error_window_ms: self.error_window_ms,
                io_timeout_ms: self.io_timeout_ms,
                probe_interval_ms: self.probe_interval_ms,
                failback_healthy_ms: self.failback_healthy_ms,
                failback_max_ms: self.failback_max_ms,
                flap_window_ms: self.flap_window_ms,
                flap_decay_ms: self.flap_decay_ms,
                pause_bound_ms: self.pause_bound_ms,
                peer_retry_ms: self.peer_retry_ms,
            },
            ghost_budget_bytes: usize::try_from(self.ghost_budget_mib.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
            dead_peer_drain_ms: session_ttl_ms,
        }
    }
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: NodeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: &'static str, message: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                field,
                message,
            })
        };
        if self.node_id == 0 {
            return bad("node_id", "must be 1 or more".into());
        }
        if self.lun.trim().is_empty() {
            return bad("lun", "must name a device, file or nbd:// target".into());
        }
        if !self.bootstrap && self.peers.is_empty() {
            return bad(
                "peers",
                "a node that does not bootstrap needs at least one peer to join".into(),
            );
        }
        let r = &self.raft;
        if r.heartbeat_ms < 10 {
            return bad("raft.heartbeat_ms", "must be at least 10".into());
        }
        if r.election_timeout_min_ms <= r.heartbeat_ms {
            return bad(
                "raft.election_timeout_min_ms",
                "must be greater than raft.heartbeat_ms".into(),
            );
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad(
                "raft.election_timeout_max_ms",
                "must be greater than raft.election_timeout_min_ms".into(),
            );
        }
        if r.snapshot_logs < 10 {
            return bad("raft.snapshot_logs", "must be at least 10".into());
        }
        if self.session.ttl_ms < 4 * r.election_timeout_max_ms {
            return bad(
                "session.ttl_ms",
                format!(
                    "must be at least 4 x raft.election_timeout_max_ms ({} ms) so a leader change does not expire sessions",
                    4 * r.election_timeout_max_ms
                ),
            );
        }
        if self.listen.rpc == self.listen.nbd {
            return bad("listen.nbd", "must differ from listen.rpc".into());
        }
        let rd = &self.redirector;
        if let Err(redirector::policy::PolicyError::InvalidConfig { field, why }) =
            rd.to_redirector(self.session.ttl_ms).policy.validate()
        {
            return bad("redirector", format!("{field} {why}"));
        }
        if rd.pause_bound_ms < rd.io_timeout_ms {
            return bad(
                "redirector.pause_bound_ms",
                "must be at least redirector.io_timeout_ms".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> &'static str {
        r#"
node_id = 1
data_dir = "/tmp/x"
lun = "/tmp/lun.img"
secret_file = "/tmp/secret"
bootstrap = true
"#
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg: NodeConfig = toml::from_str(minimal()).unwrap();
        cfg.validate(Path::new("t.toml")).unwrap();
        assert_eq!(cfg.session.ttl_ms, 10_000);
        assert_eq!(cfg.listen.rpc.port(), 7100);
    }

    #[test]
    fn unknown_key_is_refused() {
        let text = format!("{}\nlun_dirct = true\n", minimal());
        let err = toml::from_str::<NodeConfig>(&text).unwrap_err();
        assert!(err.to_string().contains("lun_dirct"), "{err}");
    }

    #[test]
    fn joiner_without_peers_is_refused() {
        let text = minimal().replace("bootstrap = true", "");
        let cfg: NodeConfig = toml::from_str(&text).unwrap();
        let err = cfg.validate(Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("peers"), "{err}");
    }

    #[test]
    fn short_ttl_is_refused() {
        let text = format!("{}\n[session]\nttl_ms = 500\n", minimal());
        let cfg: NodeConfig = toml::from_str(&text).unwrap();
        let err = cfg.validate(Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("session.ttl_ms"), "{err}");
    }

    #[test]
    fn redirector_section_has_defaults_and_is_validated() {
        let cfg: NodeConfig = toml::from_str(minimal()).unwrap();
        assert_eq!(cfg.redirector.io_timeout_ms, 1_000);
        let rc = cfg.redirector.to_redirector(cfg.session.ttl_ms);
        assert_eq!(rc.policy.pause_bound_ms, 25_000);
        assert_eq!(rc.dead_peer_drain_ms, 10_000);
        assert_eq!(rc.ghost_budget_bytes, 256 << 20);
        let text = format!("{}\n[redirector]\nio_timeout_ms = 0\n", minimal());
        let cfg: NodeConfig = toml::from_str(&text).unwrap();
        let err = cfg.validate(Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("io_timeout_ms"), "{err}");
        let text = format!(
            "{}\n[redirector]\nfailback_healthy_ms = 5000\nfailback_max_ms = 100\n",
            minimal()
        );
        let cfg: NodeConfig = toml::from_str(&text).unwrap();
        assert!(cfg.validate(Path::new("t.toml")).is_err());
        let text = format!("{}\n[redirector]\npause_bound_ms = 10\n", minimal());
        let cfg: NodeConfig = toml::from_str(&text).unwrap();
        let err = cfg.validate(Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("pause_bound_ms"), "{err}");
        let text = format!("{}\n[redirector]\nio_timeot_ms = 5\n", minimal());
        assert!(toml::from_str::<NodeConfig>(&text).is_err());
    }

    #[test]
    fn nbd_reads_default_to_the_mapping_and_take_each_path_by_name() {
        let cfg: NodeConfig = toml::from_str(minimal()).unwrap();
        assert_eq!(cfg.nbd.read_path(), nbd_backend::ReadPath::Map);
        for (text, want) in [
            ("reads = \"copy\"", nbd_backend::ReadPath::Copy),
            ("reads = \"splice\"", nbd_backend::ReadPath::Splice),
            ("reads = \"map\"", nbd_backend::ReadPath::Map),
            ("splice_reads = true", nbd_backend::ReadPath::Splice),
        ] {
            let cfg: NodeConfig =
                toml::from_str(&format!("{}\n[nbd]\n{text}\n", minimal())).unwrap();
            assert_eq!(cfg.nbd.read_path(), want, "{text}");
        }
        let text = format!("{}\n[nbd]\nreads = \"mmap\"\n", minimal());
        let err = toml::from_str::<NodeConfig>(&text).unwrap_err();
        assert!(err.to_string().contains("mmap"), "{err}");
    }

    #[test]
    fn round_trips_through_toml() {
        let cfg: NodeConfig = toml::from_str(minimal()).unwrap();
        let again: NodeConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(cfg, again);
    }
}

#[cfg(test)]
mod deploy_tests {
    use super::*;

    /// docker-compose.yml mounts these; they must stay valid configurations.
    #[test]
    fn docker_compose_node_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        let mut n = 0;
        for i in 1..=3 {
            let cfg = NodeConfig::load(&dir.join(format!("node{i}.toml"))).unwrap();
            assert_eq!(cfg.node_id, i);
            assert!(cfg.lun.starts_with("nbd://"));
            n += 1;
        }
        assert_eq!(n, 3);
    }
}
