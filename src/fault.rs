//! Fault injection into a local cluster (`csvctl --cluster DIR fault <kind> --node K`), as a
//! library the integration tests and the chaos harness share.
//!
//! SAN path faults act on node K's nbdkit (clusters started with `--san nbdkit`):
//! - `san-down`: SIGKILL the nbdkit process (a pulled cable; in-flight requests die with it);
//! - `san-hang`: pause it through its pause filter's control socket (`p`): new requests hang,
//!   and execute when it resumes, like a hung array;
//! - `san-flaky --rate R%` and `san-slow --delay Nms`: nbdkit 1.32 cannot change an error rate
//!   or a delay at run time, so these restart node K's nbdkit on the same socket with the error
//!   filter at R% or the delay filter (the profile is kept in `nodeK/san.profile`); the restart
//!   itself looks like a brief connection loss, which the node's NBD client rides out;
//! - `san-up`: resume a paused nbdkit (`r`) and, if it is dead or runs a fault profile, (re)start
//!   it with the normal profile on the same socket.
//!
//! Process faults act on node K's csvd: `kill` (SIGKILL), `restart` (start it again from its
//! `node.toml`), `pause` (SIGSTOP) and `resume` (SIGCONT).
//!
//! LAN faults (`isolate`, `heal`) cut or restore node K's links; they need a cluster started with
//! `--netns` (see [`crate::netns`]).
//!
//! Invariant: every fault leaves `DIR/cluster.json` describing the processes that now run.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cluster::{self, Children, ClusterFile, SanMode, SanProfile, node_dir};

/// A fault and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    SanDown,
    SanUp,
    SanHang,
    SanFlaky { rate_pct: f64 },
    SanSlow { delay_ms: u64 },
    Isolate,
    Heal,
    Kill,
    Restart,
    Pause,
    Resume,
}

impl Fault {
    /// Parses a CLI kind with its `--rate` (e.g. `1%`) and `--delay` (e.g. `200ms`) options.
    pub fn parse(kind: &str, rate: Option<&str>, delay: Option<&str>) -> anyhow::Result<Fault> {
        Ok(match kind {
            "san-down" => Fault::SanDown,
            "san-up" => Fault::SanUp,
            "san-hang" => Fault::SanHang,
            "san-flaky" => {
                let r = rate.unwrap_or("1%");
                let v: f64 = r
                    .trim_end_matches('%')
                    .parse()
                    .with_context(|| format!("--rate {r:?}: expected a percentage like 1%"))?;
                if !(0.0..=100.0).contains(&v) {
                    bail!("--rate {r:?} must be between 0% and 100%");
                }
                Fault::SanFlaky { rate_pct: v }
            }
            "san-slow" => {
                let d = delay.unwrap_or("200ms");
                let (num, mult) = match d.strip_suffix("ms") {
                    Some(n) => (n, 1),
                    None => (d.strip_suffix('s').unwrap_or(d), 1000),
                };
                let v: u64 = num
                    .parse()
                    .with_context(|| format!("--delay {d:?}: expected e.g. 200ms or 2s"))?;
                Fault::SanSlow { delay_ms: v * mult }
            }
            "isolate" => Fault::Isolate,
            "heal" => Fault::Heal,
            "kill" => Fault::Kill,
            "restart" => Fault::Restart,
            "pause" => Fault::Pause,
            "resume" => Fault::Resume,
            other => bail!(
                "unknown fault {other:?} (san-down, san-up, san-hang, san-flaky, san-slow, isolate, heal, kill, restart, pause, resume)"
            ),
        })
    }
}

/// Injects `fault` into node `node` of the cluster in `dir`. Processes it starts are added to
/// `children` (in their own process groups, so they may outlive the caller).
pub fn inject(
    dir: &Path,
    node: u64,
    fault: Fault,
    children: &mut Children,
    csvd: &Path,
) -> anyhow::Result<()> {
    let mut cluster = ClusterFile::load(dir)?;
    let idx = cluster
        .nodes
        .iter()
        .position(|n| n.id == node)
        .with_context(|| format!("no node {node} in this cluster"))?;
    let san_fault = matches!(
        fault,
        Fault::SanDown
            | Fault::SanUp
            | Fault::SanHang
            | Fault::SanFlaky { .. }
            | Fault::SanSlow { .. }
    );
    if san_fault && cluster.san_mode != SanMode::Nbdkit {
        bail!("SAN faults need a cluster started with --san nbdkit");
    }
    let nd = node_dir(dir, node);
    let mut entry = cluster.nodes[idx].clone();
    match fault {
        Fault::SanDown => {
            if let Some(pid) = entry.san_pid {
                kill_and_wait(pid, children)?;
            }
        }
        Fault::SanHang => pause_control(&nd.join("san.ctl"), b'p')?,
        Fault::SanUp => {
            let profile = std::fs::read_to_string(nd.join("san.profile")).unwrap_or_default();
            let alive = entry.san_pid.is_some_and(cluster::pid_alive);
            if alive {
                pause_control(&nd.join("san.ctl"), b'r')?;
                let _ = std::fs::remove_file(nd.join("san.fail"));
            }
            if !alive || profile.trim() != SanProfile::Normal.to_text() {
                if let Some(pid) = entry.san_pid {
                    kill_and_wait(pid, children)?;
                }
                cluster::start_san(dir, &cluster, &mut entry, children)?;
            }
        }
        Fault::SanFlaky { rate_pct } => restart_san(
            dir,
            &cluster,
            &mut entry,
            children,
            SanProfile::Flaky { rate_pct },
        )?,
        Fault::SanSlow { delay_ms } => restart_san(
            dir,
            &cluster,
            &mut entry,
            children,
            SanProfile::Slow { delay_ms },
        )?,
        Fault::Isolate | Fault::Heal => {
            crate::netns::set_link(dir, &cluster, node, fault == Fault::Heal)?
        }
        Fault::Kill => kill_and_wait(entry.pid, children)?,
        Fault::Restart => {
            if cluster::pid_alive(entry.pid) {
                bail!(
                    "node {node} is still running (pid {}); kill it first",
                    entry.pid
                );
            }
            entry.pid = cluster::start_node(dir, node, csvd, children)?;
        }
        Fault::Pause => cluster::signal(entry.pid, libc::SIGSTOP),
        Fault::Resume => cluster::signal(entry.pid, libc::SIGCONT),
    }
    cluster.nodes[idx] = entry;
    cluster.save(dir)
}

fn restart_san(
    dir: &Path,
    cluster: &ClusterFile,
    entry: &mut cluster::NodeEntry,
    children: &mut Children,
    profile: SanProfile,
) -> anyhow::Result<()> {
    if let Some(pid) = entry.san_pid {
        kill_and_wait(pid, children)?;
    }
    cluster::start_san_with(dir, cluster, entry, children, profile)
}

/// SIGKILL `pid` and wait until it is gone.
fn kill_and_wait(pid: u32, children: &mut Children) -> anyhow::Result<()> {
    cluster::signal(pid, libc::SIGCONT);
    cluster::signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster::pid_alive(pid) {
        children.reap();
        if Instant::now() > deadline {
            bail!("process {pid} did not die after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Sends `p` (pause) or `r` (resume) to an nbdkit pause filter's control socket and waits for
/// its acknowledgement (`P` once requests in flight have completed, `R`).
fn pause_control(sock: &Path, cmd: u8) -> anyhow::Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("cannot reach the nbdkit pause control {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(&[cmd])?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)
        .with_context(|| format!("no answer from {}", sock.display()))?;
    if ack[0] != cmd.to_ascii_uppercase() {
        bail!(
            "unexpected answer {:?} from {}",
            ack[0] as char,
            sock.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_kinds_parse_with_their_parameters() {
        assert_eq!(
            Fault::parse("san-flaky", Some("1%"), None).unwrap(),
            Fault::SanFlaky { rate_pct: 1.0 }
        );
        assert_eq!(
            Fault::parse("san-slow", None, Some("200ms")).unwrap(),
            Fault::SanSlow { delay_ms: 200 }
        );
        assert_eq!(
            Fault::parse("san-slow", None, Some("2s")).unwrap(),
            Fault::SanSlow { delay_ms: 2000 }
        );
        assert!(Fault::parse("san-flaky", Some("150%"), None).is_err());
        assert!(Fault::parse("san-slow", None, Some("fast")).is_err());
        assert!(Fault::parse("unplug", None, None).is_err());
        assert_eq!(Fault::parse("pause", None, None).unwrap(), Fault::Pause);
    }
}
