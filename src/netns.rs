//! Network namespaces for a local cluster (`csvctl cluster up --netns`), so LAN faults are real:
//! every node runs in its own network namespace, linked by a veth pair to a per-cluster bridge.
//!
//! ```text
//!   host: bridge cb<tag> 10.A.B.254/24 (csvctl reaches the nodes through it)
//!   node K: namespace csv<tag>n<K>, interface v<tag>n<K> 10.A.B.K/24, veth peer v<tag>h<K> on the bridge
//! ```
//! - csvd is started with `nsenter --net=/run/netns/...`: only the network namespace changes, so
//!   its FUSE mount stays visible on the host, and its SAN path (nbdkit on a unix socket, a
//!   separate "fabric") is unaffected by LAN faults;
//! - `isolate` sets both ends of node K's veth down (its sends fail at once, peers' packets to it
//!   are dropped); `heal` sets them up again;
//! - [`partition`] cuts the links between two groups of nodes silently (the chaos harness's
//!   `partition` fault): each side's neighbour entry for the other points at a MAC nobody has,
//!   so packets vanish and connections time out, while the host (the clients) still reaches
//!   every node; [`unpartition`] removes those entries. They are the only permanent neighbour
//!   entries in a node's namespace, so removing every permanent entry heals exactly them;
//! - names and the subnet derive from a hash of the cluster directory, so concurrent clusters
//!   do not collide; a subnet already routed on the host is refused.
//!
//! Needs root (CAP_NET_ADMIN) and the `ip` and `nsenter` tools.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterFile;

/// RPC port every node listens on inside its namespace.
pub const RPC_PORT: u16 = 7100;
/// NBD port every node listens on inside its namespace.
pub const NBD_PORT: u16 = 10809;

/// The network layout of a `--netns` cluster (kept in `cluster.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netns {
    /// Short hex tag in every name.
    pub tag: String,
    /// The /24 subnet's first three octets, e.g. `10.213.7`.
    pub prefix: String,
    pub nodes: Vec<u64>,
}

impl Netns {
    pub fn bridge(&self) -> String {
        format!("cb{}", self.tag)
    }
    pub fn ns(&self, id: u64) -> String {
        format!("csv{}n{id}", self.tag)
    }
    fn host_if(&self, id: u64) -> String {
        format!("v{}h{id}", self.tag)
    }
    fn node_if(&self, id: u64) -> String {
        format!("v{}n{id}", self.tag)
    }
    pub fn node_ip(&self, id: u64) -> String {
        format!("{}.{id}", self.prefix)
    }
    pub fn host_ip(&self) -> String {
        format!("{}.254", self.prefix)
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates the bridge and one namespace per node (ids `1..=nodes`).
pub fn create(dir: &Path, nodes: u64) -> anyhow::Result<Netns> {
    if nodes > 200 {
        bail!("--netns supports at most 200 nodes");
    }
    // FNV-1a of the directory: stable names without a hashing dependency.
    let h = dir
        .display()
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
            (h ^ u64::from(c)).wrapping_mul(0x0100_0000_01b3)
        });
    let b = h.to_le_bytes();
    let n = Netns {
        tag: format!("{:02x}{:02x}", b[0], b[1]),
        prefix: format!("10.{}.{}", 200 + b[2] % 50, b[3]),
        nodes: (1..=nodes).collect(),
    };
    let routes = Command::new("ip")
        .args(["-4", "route", "show"])
        .output()
        .context("cannot run `ip`")?;
    if String::from_utf8_lossy(&routes.stdout).contains(&format!("{}.0/24", n.prefix)) {
        bail!(
            "subnet {}.0/24 is already in use on this host (another cluster in a directory with the same hash?)",
            n.prefix
        );
    }
    let br = n.bridge();
    ip(&["link", "add", &br, "type", "bridge"])?;
    let setup = || -> anyhow::Result<()> {
        ip(&["addr", "add", &format!("{}/24", n.host_ip()), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for &id in &n.nodes {
            let ns = n.ns(id);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link",
                "add",
                &n.host_if(id),
                "type",
                "veth",
                "peer",
                "name",
                &n.node_if(id),
                "netns",
                &ns,
            ])?;
            ip(&["link", "set", &n.host_if(id), "master", &br, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", n.node_ip(id)),
                "dev",
                &n.node_if(id),
            ])?;
            ip(&["-n", &ns, "link", "set", &n.node_if(id), "up"])?;
        }
        Ok(())
    };
    if let Err(e) = setup() {
        destroy(&n);
        return Err(e);
    }
    Ok(n)
}

/// Removes the namespaces and the bridge (best effort: missing pieces are ignored).
pub fn destroy(n: &Netns) {
    for &id in &n.nodes {
        let _ = ip(&["netns", "del", &n.ns(id)]);
        let _ = ip(&["link", "del", &n.host_if(id)]);
    }
    let _ = ip(&["link", "del", &n.bridge()]);
}

/// Cuts (`up = false`) or restores node `id`'s LAN link.
pub fn set_link(dir: &Path, cluster: &ClusterFile, id: u64, up: bool) -> anyhow::Result<()> {
    let Some(n) = &cluster.netns else {
        bail!(
            "isolate/heal need a cluster started with --netns (csvctl cluster up --netns --dir {})",
            dir.display()
        );
    };
    if !n.nodes.contains(&id) {
        bail!("node {id} has no network namespace");
    }
    let state = if up { "up" } else { "down" };
    ip(&["link", "set", &n.host_if(id), state])?;
    ip(&["-n", &n.ns(id), "link", "set", &n.node_if(id), state])
}

/// A locally administered MAC that no interface has: the bridge floods frames sent to it and
/// every veth drops them (not addressed to it).
const BLACKHOLE_MAC: &str = "02:00:00:00:de:ad";

/// Runs `commands` (one `ip` command per line, without `ip`) in namespace `ns` with one
/// `ip -batch` process.
fn ip_batch(ns: &str, commands: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run `ip` (iproute2)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(commands.as_bytes())
            .context("cannot feed `ip -batch`")?;
    }
    let out = child
        .wait_with_output()
        .context("`ip -batch` did not finish")?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Cuts every link between a node of `a` and a node of `b`, both ways, silently: packets are
/// dropped (connections time out rather than fail), as behind a failed switch. Links within
/// a group, and between any node and the host, keep working. Healed by [`unpartition`].
pub fn partition(n: &Netns, a: &[u64], b: &[u64]) -> anyhow::Result<()> {
    for (from, to) in [(a, b), (b, a)] {
        for &x in from {
            if !n.nodes.contains(&x) {
                bail!("node {x} has no network namespace");
            }
            let cmds: String = to
                .iter()
                .filter(|&&y| y != x)
                .map(|&y| {
                    format!(
                        "neigh replace {} lladdr {BLACKHOLE_MAC} dev {} nud permanent\n",
                        n.node_ip(y),
                        n.node_if(x)
                    )
                })
                .collect();
            if !cmds.is_empty() {
                ip_batch(&n.ns(x), &cmds)?;
            }
        }
    }
    Ok(())
}

/// Undoes every [`partition`] on `nodes` (their permanent neighbour entries are removed; the
/// kernel resolves the peers again on the next packet).
pub fn unpartition(n: &Netns, nodes: &[u64]) -> anyhow::Result<()> {
    let mut first_err = None;
    for &x in nodes.iter().filter(|x| n.nodes.contains(x)) {
        if let Err(e) = ip(&["-n", &n.ns(x), "neigh", "flush", "nud", "permanent"]) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Every LAN fault undone: partitions removed and every link up (also what `isolate` cut).
pub fn heal_all(n: &Netns) -> anyhow::Result<()> {
    let mut first_err = unpartition(n, &n.nodes).err();
    for &id in &n.nodes {
        if let Err(e) = ip(&["link", "set", &n.host_if(id), "up"])
            .and_then(|()| ip(&["-n", &n.ns(id), "link", "set", &n.node_if(id), "up"]))
        {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// `program` run inside node `id`'s network namespace (only the network namespace).
pub fn command(n: &Netns, id: u64, program: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", n.ns(id))).arg(program);
    c
}
