//! A whole local cluster on one machine: `csvctl cluster up/down`, and the library the
//! integration tests and the chaos harness drive.
//!
//! Layout of a cluster directory:
//! ```text
//! DIR/cluster.json        the contract (see `ClusterFile`)
//! DIR/secret              the cluster secret (mode 0600)
//! DIR/lun.img             the shared LUN (a sparse file)
//! DIR/nodeK/node.toml     node K's csvd configuration
//! DIR/nodeK/data/         node K's Raft store
//! DIR/nodeK/mnt/          node K's FUSE mountpoint
//! DIR/nodeK/csvd.log      node K's log
//! DIR/nodeK/san.sock      node K's SAN path (with `--san nbdkit`)
//! ```
//! Processes are started in their own process groups, so they outlive `csvctl` with
//! `--detach` and a Ctrl-C in the terminal reaches only `csvctl`, which then stops them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lockmgr::node::MetaConfig;
use lockmgr::rpc::auth::ClusterKey;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::client::CtlClient;
use crate::config::{ListenConfig, NodeConfig, RaftConfig, RedirectorSection, SessionConfig};

/// How each node reaches the LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SanMode {
    /// Every node opens `lun.img` directly.
    File,
    /// Every node has its own nbdkit process serving `lun.img` (a breakable SAN path).
    Nbdkit,
}

/// `DIR/cluster.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterFile {
    pub lun: PathBuf,
    pub volume_uuid: String,
    pub nodes: Vec<NodeEntry>,
    pub secret_file: PathBuf,
    pub san_mode: SanMode,
    /// Set when every node runs in its own network namespace (`cluster up --netns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<crate::netns::Netns>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: u64,
    pub pid: u32,
    pub rpc: String,
    pub nbd: String,
    pub mount: PathBuf,
    /// The LUN as this node opens it (a path or an NBD URI).
    pub san: String,
    pub san_pid: Option<u32>,
}

/// Options of `csvctl cluster up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub dir: PathBuf,
    pub nodes: usize,
    pub lun_size: u64,
    pub san: SanMode,
    /// The `csvd` binary to run.
    pub csvd: PathBuf,
    pub raft: RaftConfig,
    pub session: SessionConfig,
    pub redirector: RedirectorSection,
    /// Run every node in its own network namespace (LAN faults: isolate, heal).
    pub netns: bool,
    /// How long to wait for every node to join and the voter set to settle.
    pub ready_timeout: Duration,
}

impl UpOptions {
    pub fn new(dir: impl Into<PathBuf>, nodes: usize) -> Self {
        UpOptions {
            dir: dir.into(),
            nodes,
            lun_size: 1 << 30,
            san: SanMode::File,
            csvd: default_csvd_binary(),
            raft: RaftConfig::default(),
            session: SessionConfig::default(),
            redirector: RedirectorSection::default(),
            netns: false,
            ready_timeout: Duration::from_secs(120),
        }
    }
}

/// `csvd` next to the running executable, or `$CSVD_BIN`.
pub fn default_csvd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CSVD_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| {
            let dir = p.parent()?;
            // `cargo test` binaries live in target/<profile>/deps.
            [dir.join("csvd"), dir.join("../csvd")]
                .into_iter()
                .find(|c| c.exists())
        })
        .unwrap_or_else(|| PathBuf::from("csvd"))
}

/// Parses sizes like `1G`, `512M`, `64GiB`, `4096`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("size {s:?}: expected a number with an optional unit"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => bail!("size {s:?}: unknown unit {other:?} (use K, M, G or T)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

impl ClusterFile {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("cluster.json")
    }

    pub fn load(dir: &Path) -> anyhow::Result<ClusterFile> {
        let p = Self::path(dir);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "no cluster at {} (cannot read {})",
                dir.display(),
                p.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", p.display()))
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let p = Self::path(dir);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }

    pub fn key(&self) -> anyhow::Result<ClusterKey> {
        let secret = std::fs::read(&self.secret_file)
            .with_context(|| format!("cannot read {}", self.secret_file.display()))?;
        Ok(ClusterKey::from_secret(&secret)?)
    }

    /// A client for every node of this cluster.
    pub fn client(&self) -> anyhow::Result<CtlClient> {
        Ok(CtlClient::new(
            self.nodes.iter().map(|n| (n.id, n.rpc.clone())).collect(),
            self.key()?,
        ))
    }

    pub fn node(&self, id: u64) -> anyhow::Result<&NodeEntry> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id} in this cluster"))
    }
}

pub fn node_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node{id}"))
}

/// A free port for a node (see [`csv_core::ports`] for why not the kernel's port-0 choice).
fn free_port() -> anyhow::Result<u16> {
    csv_core::ports::free_port().context("cannot find a free port")
}

/// True if `pid` is a live (not zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the ")" that closes the command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Sends `sig` to `pid`; ignores a process that is already gone.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Children started by this process, reaped when they exit (so they never linger as
/// zombies that look alive).
#[derive(Default)]
pub struct Children(BTreeMap<u32, Child>);

impl Children {
    fn add(&mut self, c: Child) -> u32 {
        let pid = c.id();
        self.0.insert(pid, c);
        pid
    }

    pub fn reap(&mut self) {
        self.0.retain(|_, c| matches!(c.try_wait(), Ok(None)));
    }
}

/// Brings up a new cluster in `opts.dir`, or restarts the stopped one found there.
pub async fn up(opts: &UpOptions, children: &mut Children) -> anyhow::Result<ClusterFile> {
    if !(1..=16).contains(&opts.nodes) {
        bail!("--nodes must be between 1 and 16 (got {})", opts.nodes);
    }
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("cannot create {}", opts.dir.display()))?;
    let dir = opts
        .dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", opts.dir.display()))?;
    if ClusterFile::path(&dir).exists() {
        let existing = ClusterFile::load(&dir)?;
        if existing.nodes.iter().any(|n| pid_alive(n.pid)) {
            bail!(
                "a cluster is already running in {} (csvctl cluster down --dir {} first)",
                dir.display(),
                dir.display()
            );
        }
        return restart(&dir, existing, opts, children).await;
    }
    if !opts.csvd.exists() && which(&opts.csvd).is_none() {
        bail!(
            "cannot find the csvd binary ({}); build it with `cargo build --release` or set CSVD_BIN",
            opts.csvd.display()
        );
    }

    let secret_file = dir.join("secret");
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&secret_file, hex.as_bytes())?;

    let lun = dir.join("lun.img");
    {
        let f = std::fs::File::create(&lun)
            .with_context(|| format!("cannot create {}", lun.display()))?;
        f.set_len(opts.lun_size)?;
    }
    let sb = crate::format::format_lun(
        &lun.display().to_string(),
        4096,
        crate::format::Existing::Refuse,
    )
    .await?;

    let mut cluster = ClusterFile {
        lun: lun.clone(),
        volume_uuid: sb.uuid_string(),
        nodes: Vec::new(),
        secret_file: secret_file.clone(),
        san_mode: opts.san,
        netns: None,
    };
    if opts.netns {
        cluster.netns = Some(crate::netns::create(&dir, opts.nodes as u64)?);
    }
    cluster.save(&dir)?;
    let mut seed = String::new();
    for id in 1..=opts.nodes as u64 {
        let nd = node_dir(&dir, id);
        std::fs::create_dir_all(nd.join("mnt"))?;
        std::fs::create_dir_all(nd.join("data"))?;
        let (rpc, nbd) = match &cluster.netns {
            Some(n) => (
                format!("{}:{}", n.node_ip(id), crate::netns::RPC_PORT),
                format!("{}:{}", n.node_ip(id), crate::netns::NBD_PORT),
            ),
            None => (
                format!("127.0.0.1:{}", free_port()?),
                format!("127.0.0.1:{}", free_port()?),
            ),
        };
        let cfg = NodeConfig {
            node_id: id,
            data_dir: nd.join("data"),
            lun: String::new(),
            lun_direct: None,
            mountpoint: Some(nd.join("mnt")),
            secret_file: secret_file.clone(),
            bootstrap: id == 1,
            peers: if id == 1 {
                Vec::new()
            } else {
                vec![seed.clone()]
            },
            listen: ListenConfig {
                rpc: rpc.parse()?,
                advertise_rpc: None,
                nbd: nbd.parse()?,
            },
            raft: opts.raft.clone(),
            session: opts.session.clone(),
            redirector: opts.redirector.clone(),
            nbd: Default::default(),
            log: "info,openraft=error".into(),
        };
        if id == 1 {
            seed = rpc.clone();
        }
        let mut entry = NodeEntry {
            id,
            pid: 0,
            rpc,
            nbd,
            mount: nd.join("mnt"),
            san: String::new(),
            san_pid: None,
        };
        start_san(&dir, &cluster, &mut entry, children)?;
        let cfg = NodeConfig {
            lun: entry.san.clone(),
            ..cfg
        };
        cfg.validate(&nd.join("node.toml"))?;
        std::fs::write(nd.join("node.toml"), cfg.to_toml())?;
        entry.pid = start_node(&dir, id, &opts.csvd, children)?;
        cluster.nodes.push(entry);
        cluster.save(&dir)?;
        if id == 1 {
            // Others join through node 1: let it bootstrap first.
            wait_nodes_ready(&cluster, 1, opts.ready_timeout).await?;
        }
    }
    wait_ready(&cluster, opts.ready_timeout).await?;
    Ok(cluster)
}

async fn restart(
    dir: &Path,
    mut cluster: ClusterFile,
    opts: &UpOptions,
    children: &mut Children,
) -> anyhow::Result<ClusterFile> {
    if let Some(n) = cluster.netns.take() {
        cluster.netns = Some(crate::netns::create(dir, n.nodes.len() as u64)?);
        cluster.save(dir)?;
    }
    for i in 0..cluster.nodes.len() {
        let mut entry = cluster.nodes[i].clone();
        start_san(dir, &cluster, &mut entry, children)?;
        entry.pid = start_node(dir, entry.id, &opts.csvd, children)?;
        cluster.nodes[i] = entry;
    }
    cluster.save(dir)?;
    wait_ready(&cluster, opts.ready_timeout).await?;
    Ok(cluster)
}

fn which(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return None;
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(p))
            .find(|c| c.exists())
    })
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

static SPAWNER: std::sync::Mutex<Option<crate::spawner::Spawner>> = std::sync::Mutex::new(None);

fn lock_spawner() -> std::sync::MutexGuard<'static, Option<crate::spawner::Spawner>> {
    SPAWNER.lock().unwrap_or_else(|p| p.into_inner())
}

/// From now on [`start_node`] starts nodes through `spawner` (see `crate::spawner`), or
/// directly again with `None`. Returns the one it replaces.
pub fn use_spawner(spawner: Option<crate::spawner::Spawner>) -> Option<crate::spawner::Spawner> {
    std::mem::replace(&mut *lock_spawner(), spawner)
}

/// Starts node `id`'s csvd from its `node.toml`; returns its pid.
pub fn start_node(
    dir: &Path,
    id: u64,
    csvd: &Path,
    children: &mut Children,
) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let nd = node_dir(dir, id);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(nd.join("csvd.log"))?;
    let mut cmd = match ClusterFile::load(dir).ok().and_then(|c| c.netns) {
        Some(n) => crate::netns::command(&n, id, csvd),
        None => Command::new(csvd),
    };
    cmd.arg("--config").arg(nd.join("node.toml"));
    if let Some(spawner) = lock_spawner().as_mut() {
        let spec = crate::spawner::SpawnSpec::from_command(&cmd, &nd.join("csvd.log"));
        return spawner
            .spawn(&spec)
            .with_context(|| format!("cannot start {}", csvd.display()));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", csvd.display()))?;
    Ok(children.add(child))
}

/// How a node's nbdkit SAN path is set up. nbdkit 1.32 has no run-time control of an error
/// rate or a delay, so those faults restart the node's nbdkit with other parameters (see
/// `crate::fault`); hang/resume and "fail everything" are controlled at run time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SanProfile {
    /// pause filter (control socket `san.ctl`) and error filter (100% while `san.fail` exists).
    Normal,
    /// Like `Normal`, but the error filter fails this percentage of requests with EIO.
    Flaky { rate_pct: f64 },
    /// Like `Normal`, plus the delay filter on reads and writes.
    Slow { delay_ms: u64 },
}

impl SanProfile {
    /// The text kept in `DIR/nodeK/san.profile`.
    pub fn to_text(&self) -> String {
        match self {
            SanProfile::Normal => "normal".into(),
            SanProfile::Flaky { rate_pct } => format!("flaky {rate_pct}%"),
            SanProfile::Slow { delay_ms } => format!("slow {delay_ms}ms"),
        }
    }
}

/// Starts node `entry`'s SAN path (an nbdkit process) if the cluster uses them, and
/// sets `entry.san` to what the node opens.
pub fn start_san(
    dir: &Path,
    cluster: &ClusterFile,
    entry: &mut NodeEntry,
    children: &mut Children,
) -> anyhow::Result<()> {
    start_san_with(dir, cluster, entry, children, SanProfile::Normal)
}

/// [`start_san`] with a fault profile.
pub fn start_san_with(
    dir: &Path,
    cluster: &ClusterFile,
    entry: &mut NodeEntry,
    _children: &mut Children,
    profile: SanProfile,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    match cluster.san_mode {
        SanMode::File => {
            entry.san = cluster.lun.display().to_string();
            entry.san_pid = None;
        }
        SanMode::Nbdkit => {
            let nd = node_dir(dir, entry.id);
            let sock = nd.join("san.sock");
            let _ = std::fs::remove_file(&sock);
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(nd.join("san.log"))?;
            // nbdkit in the foreground asks to be killed when its parent exits (so a detached
            // cluster would lose its SAN paths): let it daemonize and report its pid instead.
            let pidfile = nd.join("san.pid");
            let _ = std::fs::remove_file(&pidfile);
            let mut cmd = Command::new("nbdkit");
            cmd.arg("-P")
                .arg(&pidfile)
                .arg("--log=stderr")
                .arg("-U")
                .arg(&sock)
                .args(["--filter=pause", "--filter=error"]);
            if let SanProfile::Slow { .. } = profile {
                cmd.arg("--filter=delay");
            }
            cmd.arg("file")
                .arg(&cluster.lun)
                .arg(format!("pause-control={}", nd.join("san.ctl").display()))
                .arg("error=EIO");
            match profile {
                SanProfile::Flaky { rate_pct } => {
                    cmd.arg(format!("error-rate={rate_pct}%"));
                }
                SanProfile::Normal | SanProfile::Slow { .. } => {
                    cmd.arg("error-rate=100%")
                        .arg(format!("error-file={}", nd.join("san.fail").display()));
                }
            }
            if let SanProfile::Slow { delay_ms } = profile {
                cmd.arg(format!("rdelay={delay_ms}ms"))
                    .arg(format!("wdelay={delay_ms}ms"));
            }
            let status = cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .status()
                .context("cannot start nbdkit (is it installed? scripts/install-deps.sh)")?;
            if !status.success() {
                bail!(
                    "nbdkit for node {} failed ({status}); see {}",
                    entry.id,
                    nd.join("san.log").display()
                );
            }
            std::fs::write(nd.join("san.profile"), profile.to_text())?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let pid = loop {
                let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
                if let Ok(pid) = text.trim().parse::<u32>() {
                    break pid;
                }
                if Instant::now() > deadline {
                    bail!("nbdkit wrote no pid to {}", pidfile.display());
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            entry.san_pid = Some(pid);
            entry.san = format!("nbd+unix:///?socket={}", sock.display());
            let deadline = Instant::now() + Duration::from_secs(10);
            while !sock.exists() {
                if Instant::now() > deadline {
                    bail!(
                        "nbdkit for node {} did not create {}",
                        entry.id,
                        sock.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Ok(())
}

/// Waits until every node answers, all agree on a leader, every node has a live
/// session, and the voter set has the size the cluster wants.
pub async fn wait_ready(cluster: &ClusterFile, timeout: Duration) -> anyhow::Result<()> {
    wait_nodes_ready(cluster, cluster.nodes.len(), timeout).await
}

async fn wait_nodes_ready(
    cluster: &ClusterFile,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let client = CtlClient::new(
        cluster
            .nodes
            .iter()
            .take(n)
            .map(|e| (e.id, e.rpc.clone()))
            .collect(),
        cluster.key()?,
    );
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        for e in cluster.nodes.iter().take(n) {
            if !pid_alive(e.pid) {
                bail!(
                    "node {} exited during start-up; see {}",
                    e.id,
                    node_dir(cluster.lun.parent().unwrap_or(Path::new(".")), e.id)
                        .join("csvd.log")
                        .display()
                );
            }
        }
        let statuses = client.statuses(Duration::from_secs(1)).await;
        let answered: Vec<_> = statuses.iter().filter_map(|(_, s)| s.as_ref()).collect();
        if answered.len() == n {
            let leaders: std::collections::BTreeSet<_> =
                answered.iter().map(|s| s.leader).collect();
            let with_session = answered.iter().filter(|s| s.session.is_some()).count();
            let view = answered.iter().max_by_key(|s| s.term).copied();
            let members = view.map(|v| v.members.len()).unwrap_or(0);
            let voters = view.map(|v| v.voters.len()).unwrap_or(0);
            let want_voters = MetaConfig::desired_voters(members);
            let mounted = cluster
                .nodes
                .iter()
                .take(n)
                .filter(|e| is_mounted(&e.mount))
                .count();
            if leaders.len() == 1
                && leaders.iter().next().is_some_and(|l| l.is_some())
                && with_session == n
                && members >= n
                // On every node: one still in the middle of the voter change (joint
                // consensus) needs the old voters to elect anyone.
                && answered.iter().all(|s| s.voters.len() == want_voters)
                && mounted == n
            {
                return Ok(());
            }
            last = format!(
                "leaders {leaders:?}, sessions {with_session}/{n}, members {members}, voters {voters}/{want_voters}, mounted {mounted}/{n}"
            );
        } else {
            last = format!("{}/{} nodes answer", answered.len(), n);
        }
        if Instant::now() > deadline {
            bail!("the cluster did not become ready within {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops every node (SIGTERM, then SIGKILL after a grace period), unmounts, and stops
/// the SAN paths. Leaves the data so `cluster up` on the same directory restarts it.
pub async fn down(dir: &Path, children: &mut Children) -> anyhow::Result<()> {
    let cluster = ClusterFile::load(dir)?;
    // Followers first, the leader last: stopping nodes close their sessions through it.
    let leader = match cluster.client() {
        Ok(c) => c
            .statuses(Duration::from_secs(1))
            .await
            .into_iter()
            .filter_map(|(_, s)| s.and_then(|s| s.leader))
            .next(),
        Err(_) => None,
    };
    let (last, first): (Vec<&NodeEntry>, Vec<&NodeEntry>) =
        cluster.nodes.iter().partition(|n| Some(n.id) == leader);
    stop_nodes(&first, children).await;
    stop_nodes(&last, children).await;
    for n in &cluster.nodes {
        unmount_if_mounted(&n.mount);
        if let Some(pid) = n.san_pid
            && pid_alive(pid)
        {
            signal(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster
        .nodes
        .iter()
        .filter_map(|n| n.san_pid)
        .any(pid_alive)
    {
        children.reap();
        if Instant::now() > deadline {
            for pid in cluster.nodes.iter().filter_map(|n| n.san_pid) {
                signal(pid, libc::SIGKILL);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    children.reap();
    if let Some(n) = &cluster.netns {
        crate::netns::destroy(n);
    }
    Ok(())
}

/// SIGTERM the nodes, wait for them to exit, SIGKILL those that take too long.
async fn stop_nodes(nodes: &[&NodeEntry], children: &mut Children) {
    for n in nodes {
        if pid_alive(n.pid) {
            signal(n.pid, libc::SIGCONT);
            signal(n.pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        children.reap();
        let alive: Vec<_> = nodes.iter().filter(|n| pid_alive(n.pid)).collect();
        if alive.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for n in alive {
                tracing::warn!(
                    node = n.id,
                    pid = n.pid,
                    "node did not stop in time; killing it"
                );
                signal(n.pid, libc::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            children.reap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// True if `path` is a mountpoint (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let target = path.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m == target)
}

/// Unmounts a (possibly dead) FUSE mount.
pub fn unmount_if_mounted(path: &Path) {
    if !is_mounted(path) {
        return;
    }
    let ok = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(path)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let _ = Command::new("umount").arg("-l").arg(path).status();
    }
}
