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
//!   (02:00:00:00:de:ad: the bridge floods such frames and every veth drops them), so packets
//!   vanish and connections time out, while the host (the clients) still reaches every node;
//!   [`unpartition`] removes those entries. Both talk rtnetlink in-process rather than spawn
//!   `ip` (see `neigh` for why);
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

/// Adds (`add`) or removes blackhole neighbour entries for `peers` on interface `ifname`
/// of namespace `ns`, over rtnetlink from a short-lived thread that enters the namespace.
///
/// In-process on purpose: spawning `ip` would exec a child, and exec closes the parent's
/// close-on-exec descriptors in the child, each close of a FUSE file sending FLUSH to its
/// daemon. The chaos workloads keep files open on every node's mount, and the daemon of a
/// node cut off by a partition cannot answer a FLUSH until the partition heals, so an `ip`
/// child that should heal it would wait for its own result.
fn neigh(ns: &str, ifname: &str, peers: &[std::net::Ipv4Addr], add: bool) -> anyhow::Result<()> {
    let (ns, ifname, peers) = (ns.to_string(), ifname.to_string(), peers.to_vec());
    std::thread::Builder::new()
        .name("csv-netns".into())
        .spawn(move || neigh_in(&ns, &ifname, &peers, add))
        .context("cannot start the netlink thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the netlink thread panicked"))?
}

/// Body of [`neigh`]: runs on a thread of its own, which it moves into namespace `ns`.
fn neigh_in(ns: &str, ifname: &str, peers: &[std::net::Ipv4Addr], add: bool) -> anyhow::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let nsfile = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("no network namespace {ns}"))?;
    // SAFETY: setns(2) on a valid namespace descriptor; it changes the namespace of this
    // thread only, a thread of our own that ends when this function returns.
    if unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot enter network namespace {ns}"));
    }
    let cname = std::ffi::CString::new(ifname)?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname} in namespace {ns}");
    }
    // SAFETY: socket(2) has no memory preconditions; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot open a netlink socket");
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mac: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0xde, 0xad];
    for (seq, peer) in peers.iter().enumerate() {
        // nlmsghdr (16) + ndmsg (12) + NDA_DST (4 + 4) + NDA_LLADDR (4 + 6, padded to 12).
        let mut m: Vec<u8> = Vec::with_capacity(48);
        let (kind, flags) = if add {
            (
                libc::RTM_NEWNEIGH,
                libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE,
            )
        } else {
            (libc::RTM_DELNEIGH, libc::NLM_F_REQUEST | libc::NLM_F_ACK)
        };
        let len: u32 = if add { 48 } else { 36 };
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&(flags as u16).to_ne_bytes());
        m.extend_from_slice(&(seq as u32 + 1).to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        // ndmsg: family, 3 pad bytes, ifindex, state, flags, type.
        m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
        m.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        m.extend_from_slice(&libc::NUD_PERMANENT.to_ne_bytes());
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&libc::NDA_DST.to_ne_bytes());
        m.extend_from_slice(&peer.octets());
        if add {
            m.extend_from_slice(&10u16.to_ne_bytes());
            m.extend_from_slice(&libc::NDA_LLADDR.to_ne_bytes());
            m.extend_from_slice(&mac);
            m.extend_from_slice(&[0, 0]);
        }
        debug_assert_eq!(m.len(), len as usize);
        // SAFETY: a zeroed sockaddr_nl is valid (pid 0: the kernel); only the family is set.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `m` and `to` are valid for the lengths given for the duration of the call.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                m.as_ptr().cast(),
                m.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent != m.len() as isize {
            return Err(std::io::Error::last_os_error()).context("cannot send to rtnetlink");
        }
        let mut ack = [0u8; 256];
        // SAFETY: `ack` is valid for writes of its length for the duration of the call.
        let got = unsafe { libc::recv(sock.as_raw_fd(), ack.as_mut_ptr().cast(), ack.len(), 0) };
        if got < 20 {
            return Err(std::io::Error::last_os_error()).context("no answer from rtnetlink");
        }
        let kind = u16::from_ne_bytes([ack[4], ack[5]]);
        let errno = -i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]);
        if kind != libc::NLMSG_ERROR as u16 {
            bail!("unexpected rtnetlink answer of type {kind}");
        }
        // Removing an entry that is not there is what heal_all does for every pair.
        let absent_on_removal = errno == libc::ENOENT && !add;
        if errno != 0 && !absent_on_removal {
            return Err(std::io::Error::from_raw_os_error(errno)).with_context(|| {
                format!(
                    "cannot {} the neighbour entry of {peer} in {ns}",
                    if add { "set" } else { "remove" }
                )
            });
        }
    }
    Ok(())
}

fn ips(n: &Netns, nodes: impl Iterator<Item = u64>) -> anyhow::Result<Vec<std::net::Ipv4Addr>> {
    nodes
        .map(|y| {
            n.node_ip(y)
                .parse()
                .with_context(|| format!("bad node address {}", n.node_ip(y)))
        })
        .collect()
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
            let peers = ips(n, to.iter().copied().filter(|&y| y != x))?;
            if !peers.is_empty() {
                neigh(&n.ns(x), &n.node_if(x), &peers, true)?;
            }
        }
    }
    Ok(())
}

/// Undoes every [`partition`] on `nodes`: their blackhole entries for every other node are
/// removed (the kernel resolves the peers again on the next packet).
pub fn unpartition(n: &Netns, nodes: &[u64]) -> anyhow::Result<()> {
    let mut first_err = None;
    for &x in nodes.iter().filter(|x| n.nodes.contains(x)) {
        let peers = ips(n, n.nodes.iter().copied().filter(|&y| y != x))?;
        if let Err(e) = neigh(&n.ns(x), &n.node_if(x), &peers, false) {
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
