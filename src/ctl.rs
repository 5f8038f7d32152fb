//! `csvctl`: command-line parsing and the commands. Every read command takes `--json`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use lockmgr::rpc::auth::ClusterKey;
use lockmgr::rpc::message::{Query, QueryReply, Reply, Request};

use crate::client::CtlClient;
use crate::cluster::{self, Children, ClusterFile, SanMode, UpOptions};

#[derive(Parser)]
#[command(
    name = "csvctl",
    version,
    about = "Operate a csvd cluster (Cluster Shared Volumes for Linux)"
)]
pub struct Cli {
    /// A local cluster directory made by `csvctl cluster up`.
    #[arg(long, global = true, env = "CSV_CLUSTER")]
    pub cluster: Option<PathBuf>,
    /// Node RPC addresses to talk to (instead of --cluster), e.g. 10.0.0.1:7100.
    #[arg(long = "node-addr", global = true)]
    pub node_addr: Vec<String>,
    /// The cluster secret file (with --node-addr).
    #[arg(long, global = true)]
    pub secret_file: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Write a new volume superblock to a LUN (a device, a file, or nbd://...).
    Format {
        #[arg(long)]
        lun: String,
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Overwrite an existing csvd volume.
        #[arg(long, conflicts_with = "keep_existing")]
        force: bool,
        /// Succeed without writing if the LUN already holds a csvd volume.
        #[arg(long)]
        keep_existing: bool,
        #[arg(long)]
        json: bool,
    },
    /// The cluster: leader, term, and per node its role and SAN path state.
    Status(JsonFlag),
    /// The nodes the metadata service knows (addresses, sessions, path state).
    Nodes(JsonFlag),
    /// Locks, their holders and fencing tokens.
    Locks(JsonFlag),
    /// Take, release or check a lock through one node's session (for operators and tests).
    #[command(subcommand)]
    Lock(LockCmd),
    /// Start or stop a whole local cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Benchmarks against a running cluster.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Fault-injection run: workloads plus a seeded fault schedule, then checkers.
    /// Exit status 0 only when every checker is valid.
    Chaos(ChaosArgs),
    /// Check the volume's allocation and namespace invariants: on every node of a live
    /// cluster, or offline on stopped nodes' Raft stores (`--store`, `--offline`).
    Fsck {
        /// A stopped node's Raft store (or its node or data directory); repeatable.
        #[arg(long)]
        store: Vec<PathBuf>,
        /// Check every node's store of the (stopped) local cluster given by --cluster.
        #[arg(long)]
        offline: bool,
        #[arg(long)]
        json: bool,
    },
    /// NBD exports: the volume's files, their clients and write owners.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Move an export's write ownership to node K (the live-migration handoff); returns
    /// once node K holds it and prints the handoff time.
    Migrate {
        /// The export: a path relative to the volume root, e.g. vms/a.vhd.
        export: String,
        #[arg(long)]
        to: u64,
        #[arg(long)]
        json: bool,
    },
    /// Inject a fault into a local cluster (--cluster DIR): san-down, san-up, san-hang,
    /// san-flaky [--rate 1%], san-slow [--delay 200ms], isolate, heal, kill, restart, pause,
    /// resume.
    Fault {
        kind: String,
        #[arg(long)]
        node: u64,
        /// Error rate of san-flaky.
        #[arg(long)]
        rate: Option<String>,
        /// Added latency of san-slow (e.g. 200ms).
        #[arg(long)]
        delay: Option<String>,
    },
    /// A node's SAN path: maintenance redirect on or off, redirector counters.
    #[command(subcommand)]
    Path(PathCmd),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ChaosArgs {
    #[command(subcommand)]
    pub cmd: Option<ChaosCmd>,
    /// Nodes of the local cluster to start (ignored with --cluster).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// How long the workloads run under faults: 60s, 10m, 1h.
    #[arg(long, default_value = "60s")]
    pub duration: String,
    /// Seed of the fault schedule and the workloads (random if not given; always printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Fault kinds, comma-separated (or none): kill, pause, leader (kill -9 / SIGSTOP a
    /// node or the leader); migrate (move an nbd export; needs --workload nbd); san-down,
    /// san-hang, san-flaky (kill, pause or make flaky a node's nbdkit SAN path: the started
    /// cluster gets --san nbdkit); partition (cut a node, the leader or a minority off the
    /// LAN: the started cluster gets --netns, which needs root). With --cluster, a cluster
    /// lacking what a kind needs is refused up front.
    #[arg(long, default_value = "kill,pause,leader")]
    pub faults: String,
    /// Workloads: meta, nbd, fuse.
    #[arg(long, default_value = "meta")]
    pub workload: String,
    #[arg(long)]
    pub json: bool,
    /// Start the cluster in DIR and keep it (with the history) after the run.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Where to write the history (JSON lines).
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// Session TTL of the cluster the run starts, in ms (at least 4 election timeouts).
    #[arg(long, default_value_t = 4_000)]
    pub session_ttl_ms: u64,
}

#[derive(Subcommand)]
pub enum ChaosCmd {
    /// Re-run the checkers on a saved history and print the report.
    Check {
        history: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ExportCmd {
    /// Every export, its clients per node, and which node holds its write lock.
    List(JsonFlag),
}

#[derive(Subcommand)]
pub enum PathCmd {
    /// Send the node's I/O through a peer (maintenance), while a peer is healthy.
    Redirect {
        #[arg(long)]
        node: u64,
    },
    /// Withdraw the maintenance redirect (the node fails back once its path is healthy).
    Direct {
        #[arg(long)]
        node: u64,
    },
    /// The node's redirector counters and ghost-write ledger.
    Stats {
        #[arg(long)]
        node: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Metadata operations per second with p50/p99 latency: create an entry; acquire and
    /// release a lock. Workers are spread over the nodes.
    Meta {
        #[arg(long, default_value_t = 2000)]
        ops: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long)]
        json: bool,
    },
    /// Redirected against direct block I/O on one node, and the failover stall distribution
    /// (needs --cluster DIR of a `--san nbdkit` cluster).
    Redirect {
        #[arg(long, default_value_t = 1)]
        node: u64,
        /// Seconds of each throughput run.
        #[arg(long, default_value_t = 5)]
        secs: u64,
        /// Fault injections for the stall distribution.
        #[arg(long, default_value_t = 20)]
        injections: usize,
        #[arg(long, default_value_t = 65536)]
        block_size: usize,
        #[arg(long, default_value_t = 16)]
        workers: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum LockCmd {
    Acquire {
        key: String,
        #[arg(long)]
        node: u64,
        #[arg(long)]
        shared: bool,
    },
    Release {
        key: String,
        #[arg(long)]
        node: u64,
    },
    /// Exit 0 if `token` is still the node's valid grant of `key`, 1 if it is stale.
    Check {
        key: String,
        #[arg(long)]
        node: u64,
        #[arg(long)]
        token: u64,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Create (or restart) a local cluster: LUN file, N nodes, mounts, NBD ports.
    Up {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Size of the LUN file (sparse), e.g. 1G, 20G.
        #[arg(long, default_value = "1G")]
        lun_size: String,
        /// How each node reaches the LUN: the file itself, or its own nbdkit process.
        #[arg(long, value_enum, default_value_t = SanMode::File)]
        san: SanMode,
        /// Return once the cluster is up, leaving it running.
        #[arg(long)]
        detach: bool,
        /// Session TTL in ms (how long a dead node keeps its locks).
        #[arg(long, default_value_t = 10_000)]
        session_ttl_ms: u64,
        /// Run every node in its own network namespace (needs root; enables isolate/heal).
        #[arg(long)]
        netns: bool,
        /// The nodes' redirector I/O timeout (`[redirector] io_timeout_ms`).
        #[arg(long, default_value_t = 1_000)]
        io_timeout_ms: u64,
        /// The nodes' failback healthy time (`[redirector] failback_healthy_ms`).
        #[arg(long, default_value_t = 10_000)]
        failback_ms: u64,
        /// The nodes' flap window (`[redirector] flap_window_ms`): a path failing this soon after
        /// a failback doubles the failback time.
        #[arg(long, default_value_t = 60_000)]
        flap_window_ms: u64,
    },
    /// Stop a local cluster; nothing stays mounted or running. Data is kept.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Runs one command; the exit code says whether it succeeded.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Format {
            ref lun,
            block_size,
            force,
            keep_existing,
            json,
        } => {
            let existing = match (force, keep_existing) {
                (true, _) => crate::format::Existing::Overwrite,
                (_, true) => crate::format::Existing::Keep,
                _ => crate::format::Existing::Refuse,
            };
            let sb = crate::format::format_lun(lun, block_size, existing).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"lun": lun, "volume_uuid": sb.uuid_string(), "block_size": block_size, "size": sb.volume_size})
                );
            } else {
                println!(
                    "formatted {lun}: volume {} ({} bytes, {block_size}-byte blocks)",
                    sb.uuid_string(),
                    sb.volume_size
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status(JsonFlag { json }) => {
            let st = client(&cli)?.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!(
                    "leader: {}   term: {}",
                    st.leader
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "none".into()),
                    st.term
                );
                println!(
                    "{:>4}  {:<8} {:<6} {:<11} {:<6} {:<10} reason",
                    "node", "role", "alive", "path", "peer", "since"
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                for n in &st.nodes {
                    println!(
                        "{:>4}  {:<8} {:<6} {:<11} {:<6} {:<10} {}",
                        n.id,
                        n.role,
                        if n.alive { "yes" } else { "NO" },
                        n.path,
                        n.peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        n.since_ms
                            .filter(|&s| s > 0)
                            .map(|s| format_age(now.saturating_sub(s)))
                            .unwrap_or_else(|| "-".into()),
                        n.reason.clone().unwrap_or_else(|| "-".into())
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Nodes(JsonFlag { json }) => {
            let QueryReply::Nodes(nodes) = client(&cli)?.query(Query::Nodes).await? else {
                bail!("unexpected answer");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                println!(
                    "{:>4}  {:<21} {:<21} {:<8} {:<11} mount",
                    "node", "rpc", "nbd", "session", "path"
                );
                for n in &nodes {
                    println!(
                        "{:>4}  {:<21} {:<21} {:<8} {:<11} {}",
                        n.id,
                        n.rpc_addr,
                        n.nbd_addr,
                        n.session
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "-".into()),
                        n.path.state.as_str(),
                        n.mount
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Locks(JsonFlag { json }) => {
            let QueryReply::Locks(locks) = client(&cli)?.query(Query::Locks).await? else {
                bail!("unexpected answer");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&locks)?);
            } else if locks.is_empty() {
                println!("no locks held");
            } else {
                println!(
                    "{:<32} {:<9} {:>4} {:>8} {:>8}",
                    "key", "mode", "node", "session", "token"
                );
                for l in &locks {
                    for h in &l.holders {
                        println!(
                            "{:<32} {:<9} {:>4} {:>8} {:>8}{}",
                            l.key,
                            format!("{:?}", h.mode).to_lowercase(),
                            h.node,
                            h.session,
                            h.token,
                            l.break_requested_by
                                .map(|n| format!("  (break requested by node {n})"))
                                .unwrap_or_default()
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Lock(ref cmd) => {
            let c = client(&cli)?;
            let (node, req) = match cmd {
                LockCmd::Acquire { key, node, shared } => (
                    *node,
                    Request::LockAcquire {
                        key: key.clone(),
                        exclusive: !shared,
                    },
                ),
                LockCmd::Release { key, node } => {
                    (*node, Request::LockRelease { key: key.clone() })
                }
                LockCmd::Check { key, node, token } => (
                    *node,
                    Request::LockValidate {
                        key: key.clone(),
                        token: *token,
                    },
                ),
            };
            match c.call(node, req, Duration::from_secs(20)).await? {
                Reply::Lock(Ok(token)) => {
                    println!("{token}");
                    Ok(ExitCode::SUCCESS)
                }
                Reply::Lock(Err(e)) => {
                    eprintln!("csvctl: {e}");
                    Ok(ExitCode::from(1))
                }
                other => bail!("unexpected answer {other:?}"),
            }
        }
        Cmd::Cluster(ClusterCmd::Up {
            ref dir,
            nodes,
            ref lun_size,
            san,
            detach,
            session_ttl_ms,
            netns,
            io_timeout_ms,
            failback_ms,
            flap_window_ms,
        }) => {
            let mut opts = UpOptions::new(dir.clone(), nodes);
            opts.netns = netns;
            opts.redirector.io_timeout_ms = io_timeout_ms;
            opts.redirector.failback_healthy_ms = failback_ms;
            opts.redirector.flap_window_ms = flap_window_ms;
            opts.lun_size = cluster::parse_size(lun_size)?;
            opts.san = san;
            opts.session.ttl_ms = session_ttl_ms;
            let mut children = Children::default();
            let up = cluster::up(&opts, &mut children).await;
            let c = match up {
                Ok(c) => c,
                Err(e) => {
                    if ClusterFile::path(dir).exists() {
                        let _ = cluster::down(dir, &mut children).await;
                    }
                    return Err(e);
                }
            };
            print_next_steps(dir, &c, detach);
            if detach {
                // The children run in their own process groups and outlive us.
                std::mem::forget(children);
                return Ok(ExitCode::SUCCESS);
            }
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            eprintln!("stopping the cluster ...");
            cluster::down(dir, &mut children).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Meta {
            ops,
            concurrency,
            json,
        }) => {
            let dir = cli
                .cluster
                .as_ref()
                .context("bench needs --cluster DIR (or CSV_CLUSTER)")?;
            let rows = crate::bench::meta(&ClusterFile::load(dir)?, ops, concurrency).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", crate::bench::table(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Chaos(ref args) => chaos(&cli, args).await,
        Cmd::Fsck {
            ref store,
            offline,
            json,
        } => fsck(&cli, store, offline, json).await,
        Cmd::Export(ExportCmd::List(JsonFlag { json })) => {
            let c = client(&cli)?;
            let rows = crate::exports::list(&c, &c.node_ids()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                crate::exports::print_table(&rows);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Migrate {
            ref export,
            to,
            json,
        } => {
            let m = crate::exports::migrate(&client(&cli)?, export, to).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                println!(
                    "{} now written through node {} (handoff {:.1} ms, total {:.1} ms, fencing token {})",
                    m.export, m.to, m.handoff_ms, m.total_ms, m.token
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fault {
            ref kind,
            node,
            ref rate,
            ref delay,
        } => {
            let dir = cli
                .cluster
                .as_ref()
                .context("fault needs --cluster DIR (or CSV_CLUSTER)")?;
            let fault = crate::fault::Fault::parse(kind, rate.as_deref(), delay.as_deref())?;
            let mut children = Children::default();
            let r = crate::fault::inject(
                dir,
                node,
                fault,
                &mut children,
                &cluster::default_csvd_binary(),
            );
            // Processes we started (nbdkit, csvd) run in their own process groups and outlive us.
            std::mem::forget(children);
            r?;
            println!("node {node}: {kind} injected");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Path(ref cmd) => {
            use crate::redirect::{DiagReply, DiagRequest, diag};
            let c = client(&cli)?;
            let (node, req, json) = match cmd {
                PathCmd::Redirect { node } => (*node, DiagRequest::UserRedirect(true), false),
                PathCmd::Direct { node } => (*node, DiagRequest::UserRedirect(false), false),
                PathCmd::Stats { node, json } => (*node, DiagRequest::Stats, *json),
            };
            match diag(&c, node, &req, Duration::from_secs(10)).await? {
                DiagReply::Stats {
                    mode,
                    stats,
                    ghosts,
                    rewrites_in_flight,
                } => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"node": node, "mode": mode, "stats": stats, "ghosts": ghosts, "rewrites_in_flight": rewrites_in_flight})
                        );
                    } else {
                        println!("node {node}: {mode}");
                        println!(
                            "  unresolved ghost writes: {ghosts}, rewrites in flight: {rewrites_in_flight}"
                        );
                        println!("  {stats:?}");
                    }
                }
                DiagReply::Done => println!("node {node}: ok"),
                other => bail!("unexpected answer {other:?}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Redirect {
            node,
            secs,
            injections,
            block_size,
            workers,
            json,
        }) => {
            let dir = cli
                .cluster
                .as_ref()
                .context("bench needs --cluster DIR (or CSV_CLUSTER)")?;
            let b = crate::redirect_bench::run(dir, node, secs, injections, block_size, workers)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                print!("{}", crate::redirect_bench::table(&b));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cluster(ClusterCmd::Down { ref dir }) => {
            cluster::down(dir, &mut Children::default()).await?;
            println!(
                "cluster in {} stopped; nothing mounted or running",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `12s`, `5m03s`, `2h10m` ago.
fn format_age(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s}s ago")
    } else if s < 3600 {
        format!("{}m{:02}s ago", s / 60, s % 60)
    } else {
        format!("{}h{:02}m ago", s / 3600, (s % 3600) / 60)
    }
}

fn print_next_steps(dir: &std::path::Path, c: &ClusterFile, detach: bool) {
    let d = dir.display();
    println!(
        "csvd cluster up: {} nodes, volume {}",
        c.nodes.len(),
        c.volume_uuid
    );
    println!("  LUN:      {}", c.lun.display());
    for n in &c.nodes {
        println!(
            "  node {:>2}: rpc {}  nbd {}  mount {}  pid {}",
            n.id,
            n.rpc,
            n.nbd,
            n.mount.display(),
            n.pid
        );
    }
    println!();
    println!("Next:");
    println!("  csvctl --cluster {d} status          # leader, roles, SAN path per node");
    println!("  csvctl --cluster {d} locks           # locks and fencing tokens");
    println!("  csvctl --cluster {d} lock acquire vm1 --node 1");
    if let (Some(n1), Some(n2)) = (c.nodes.first(), c.nodes.get(1)) {
        let m = n1.mount.display();
        println!("VM disks live on the mounts and are served over NBD by every node:");
        println!("  mkdir -p {m}/vms && qemu-img create -f vpc {m}/vms/vm1.vhd 20G");
        println!(
            "  qemu-io -f raw -c 'write -P 0xab 0 1M' nbd://{}/vms/vm1.vhd",
            n1.nbd
        );
        println!(
            "  qemu-io -f raw -c 'read -P 0xab 0 1M' nbd://{}/vms/vm1.vhd",
            n2.nbd
        );
        println!("  csvctl --cluster {d} export list");
        println!(
            "  csvctl --cluster {d} migrate vms/vm1.vhd --to {}   # live-migration handoff",
            n2.id
        );
        println!("  csvctl --cluster {d} chaos --duration 60s           # fault-injection check");
    }
    if detach {
        println!("  csvctl cluster down --dir {d}        # stop everything");
    } else {
        println!("Press Ctrl-C to stop the cluster.");
    }
}

fn print_report(r: &crate::chaos::report::Report, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        print!("{}", r.table());
    }
    Ok(if r.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn chaos(cli: &Cli, args: &ChaosArgs) -> anyhow::Result<ExitCode> {
    use crate::chaos::{self, ChaosOptions, history::History, report::Report};
    if let Some(ChaosCmd::Check { history, json }) = &args.cmd {
        let h = History::load(history)?;
        eprintln!("csvctl chaos check: seed {}", h.header.seed);
        return print_report(
            &Report::from_history(&h, &history.display().to_string()),
            *json,
        );
    }
    let duration =
        chaos::schedule::parse_duration(&args.duration).map_err(|e| anyhow::anyhow!(e))?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut opts = ChaosOptions::new(args.nodes, duration, seed);
    opts.faults = chaos::schedule::FaultKind::parse_list(&args.faults)
        .map_err(|e| anyhow::anyhow!("--faults: {e}"))?;
    opts.workloads = chaos::workload::WorkloadKind::parse_list(&args.workload)
        .map_err(|e| anyhow::anyhow!("--workload: {e}"))?;
    opts.keep = args.keep.clone();
    opts.cluster = cli.cluster.clone();
    opts.history = args.history.clone();
    opts.session_ttl_ms = args.session_ttl_ms;
    eprintln!(
        "csvctl chaos: seed {seed} (replay with --seed {seed}); history {}",
        opts.history_path().display()
    );
    // Ctrl-C ends the fault phase early; the run still heals, converges and checks.
    let interrupt = opts.interrupt.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("csvctl chaos: interrupted; healing and checking the run so far");
            interrupt.cancel();
        }
    });
    let report = chaos::run(&opts).await?;
    print_report(&report, args.json)
}

async fn fsck(
    cli: &Cli,
    stores: &[PathBuf],
    offline: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut stores = stores.to_vec();
    if offline {
        let dir = cli
            .cluster
            .as_ref()
            .context("--offline needs --cluster DIR (or give --store PATH)")?;
        let c = ClusterFile::load(dir)?;
        stores.extend(c.nodes.iter().map(|n| dir.join(format!("node{}", n.id))));
    }
    let mut clean = true;
    if !stores.is_empty() {
        let mut out = Vec::new();
        for s in &stores {
            let r = crate::fsck::offline(s).await?;
            clean &= r.violations.is_empty();
            out.push(r);
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            for r in &out {
                print_fsck(
                    &r.store.display().to_string(),
                    r.applied,
                    Some(&r.violations),
                    "",
                );
            }
        }
    } else {
        let (c, ids) = client_and_ids(cli)?;
        let out = crate::fsck::live(&c, &ids).await;
        if json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            for r in &out {
                print_fsck(
                    &format!("node {}", r.node),
                    r.applied,
                    r.violations.as_ref(),
                    &r.error,
                );
            }
        }
        clean = out
            .iter()
            .all(|r| r.violations.as_ref().is_some_and(|v| v.is_empty()));
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_fsck(what: &str, applied: u64, violations: Option<&Vec<String>>, error: &str) {
    match violations {
        Some(v) if v.is_empty() => println!("{what}: clean at log index {applied}"),
        Some(v) => {
            println!("{what}: {} violations at log index {applied}", v.len());
            for e in v {
                println!("  {e}");
            }
        }
        None => println!("{what}: NOT CHECKED: {error}"),
    }
}

/// A client and the ids of the nodes it talks to.
fn client_and_ids(cli: &Cli) -> anyhow::Result<(CtlClient, Vec<u64>)> {
    let ids = if cli.node_addr.is_empty() {
        let dir = cli.cluster.as_ref().context(
            "say which cluster: --cluster DIR (or CSV_CLUSTER), or --node-addr with --secret-file",
        )?;
        ClusterFile::load(dir)?.nodes.iter().map(|n| n.id).collect()
    } else {
        (1..=cli.node_addr.len() as u64).collect()
    };
    Ok((client(cli)?, ids))
}

fn client(cli: &Cli) -> anyhow::Result<CtlClient> {
    if !cli.node_addr.is_empty() {
        let secret = cli
            .secret_file
            .as_ref()
            .context("--node-addr needs --secret-file")?;
        let key = ClusterKey::from_secret(
            &std::fs::read(secret).with_context(|| format!("cannot read {}", secret.display()))?,
        )?;
        return Ok(CtlClient::new(
            cli.node_addr
                .iter()
                .enumerate()
                .map(|(i, a)| (i as u64 + 1, a.clone()))
                .collect(),
            key,
        ));
    }
    let dir = cli.cluster.as_ref().context(
        "say which cluster: --cluster DIR (or CSV_CLUSTER), or --node-addr with --secret-file",
    )?;
    ClusterFile::load(dir)?.client()
}
