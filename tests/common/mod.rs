//! Shared helpers for the integration tests: a real local cluster in a temp dir,
//! torn down (processes killed, mounts removed) when the test ends, pass or fail.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use csvd::client::CtlClient;
use csvd::cluster::{self, Children, ClusterFile, UpOptions};
use lockmgr::rpc::message::{Reply, Request};

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub file: ClusterFile,
    pub children: Children,
    pub opts: UpOptions,
}

pub fn csvd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_csvd"))
}

pub fn options(dir: &Path, nodes: usize) -> UpOptions {
    let mut o = UpOptions::new(dir, nodes);
    o.csvd = csvd_bin();
    o.lun_size = 256 << 20;
    o.session.ttl_ms = 4_000;
    o.raft.voter_replace_after_ms = 8_000;
    o
}

impl TestCluster {
    pub async fn up(nodes: usize) -> TestCluster {
        Self::up_with(nodes, |_| {}).await
    }

    pub async fn up_with(nodes: usize, tweak: impl FnOnce(&mut UpOptions)) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("csvd-test-")
            .tempdir()
            .unwrap();
        let mut opts = options(dir.path(), nodes);
        tweak(&mut opts);
        let mut children = Children::default();
        let file = match cluster::up(&opts, &mut children).await {
            Ok(f) => f,
            Err(e) => {
                dump_logs(dir.path());
                kill_everything(dir.path());
                panic!("cluster up failed: {e:#}");
            }
        };
        TestCluster {
            dir,
            file,
            children,
            opts,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn client(&self) -> CtlClient {
        self.file.client().unwrap()
    }

    pub fn pid(&self, node: u64) -> u32 {
        self.file.node(node).unwrap().pid
    }

    pub fn signal(&self, node: u64, sig: i32) {
        cluster::signal(self.pid(node), sig);
    }

    /// kill -9 and wait until the process is gone.
    pub fn kill9(&mut self, node: u64) {
        self.stop(node, libc::SIGKILL, Duration::from_secs(10));
    }

    /// Sends `sig` to the node and waits up to `timeout` until its process is gone.
    pub fn stop(&mut self, node: u64, sig: i32, timeout: Duration) {
        let pid = self.pid(node);
        cluster::signal(pid, sig);
        wait_until(timeout, "process to exit", || {
            self.children.reap();
            !cluster::pid_alive(pid)
        });
    }

    /// Restarts a stopped node from its config.
    pub fn restart(&mut self, node: u64) {
        let pid = cluster::start_node(self.dir.path(), node, &self.opts.csvd, &mut self.children)
            .unwrap();
        for n in self.file.nodes.iter_mut() {
            if n.id == node {
                n.pid = pid;
            }
        }
        self.file.save(self.dir.path()).unwrap();
    }

    /// The leader as the given nodes see it (all must agree), waiting up to `timeout`.
    pub async fn leader_among(&self, nodes: &[u64], timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.client().statuses(Duration::from_secs(1)).await;
            let leaders: Vec<_> = st
                .iter()
                .filter(|(id, _)| nodes.contains(id))
                .map(|(_, s)| s.as_ref().and_then(|s| s.leader))
                .collect();
            if leaders.len() == nodes.len()
                && let Some(Some(l)) = leaders.first()
                && leaders.iter().all(|x| *x == Some(*l))
                && nodes.contains(l)
            {
                return *l;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {nodes:?} within {timeout:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// For a 3-node cluster: (leader, one follower, the other follower).
    pub async fn leader_and_followers(&self) -> (u64, u64, u64) {
        let leader = self.leader_among(&[1, 2, 3], Duration::from_secs(10)).await;
        let mut f = [1, 2, 3].into_iter().filter(|n| *n != leader);
        let (a, b) = (f.next().unwrap(), f.next().unwrap());
        (leader, a, b)
    }

    pub async fn call(&self, node: u64, req: Request) -> Reply {
        self.client()
            .call(node, req, Duration::from_secs(20))
            .await
            .unwrap()
    }

    /// Takes `key` through node's session; Ok(token) or Err(reason).
    pub async fn acquire(&self, node: u64, key: &str) -> Result<u64, String> {
        match self
            .call(
                node,
                Request::LockAcquire {
                    key: key.into(),
                    exclusive: true,
                },
            )
            .await
        {
            Reply::Lock(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    pub fn log(&self, node: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{node}/csvd.log")))
            .unwrap_or_default()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump_logs(self.dir.path());
        }
        kill_everything(self.dir.path());
        self.children.reap();
    }
}

/// SIGKILL every process of the cluster in `dir` and remove its mounts.
pub fn kill_everything(dir: &Path) {
    let Ok(c) = ClusterFile::load(dir) else {
        return;
    };
    for n in &c.nodes {
        cluster::signal(n.pid, libc::SIGCONT);
        cluster::signal(n.pid, libc::SIGKILL);
        if let Some(p) = n.san_pid {
            cluster::signal(p, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.nodes.iter().any(|n| cluster::pid_alive(n.pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for n in &c.nodes {
        cluster::unmount_if_mounted(&n.mount);
    }
    if let Some(n) = &c.netns {
        csvd::netns::destroy(n);
    }
}

pub fn dump_logs(dir: &Path) {
    for k in 1..=16 {
        let p = dir.join(format!("node{k}/csvd.log"));
        if let Ok(text) = std::fs::read_to_string(&p) {
            let tail: Vec<_> = text.lines().rev().take(30).collect();
            eprintln!("---- node{k} log (last 30 lines) ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Polls `cond` until true, failing the test with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Node `k`'s FUSE mountpoint.
pub fn mnt(c: &TestCluster, k: u64) -> PathBuf {
    c.file.node(k).unwrap().mount.clone()
}

/// The NBD URI of export `name` on node `k`.
pub fn uri(c: &TestCluster, k: u64, name: &str) -> String {
    format!("nbd://{}/{name}", c.file.node(k).unwrap().nbd)
}

/// Waits until node `k`'s volume is mounted (after a restart).
pub fn wait_mounted(c: &TestCluster, k: u64, timeout: Duration) {
    let m = mnt(c, k);
    wait_until(timeout, "the volume to be mounted", || {
        cluster::is_mounted(&m) && std::fs::read_dir(&m).is_ok()
    });
}

/// Runs a command, failing the test with its output if it fails; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A linearizable fsck of the metadata (every invariant of the state machine).
pub async fn fsck(c: &TestCluster) {
    use lockmgr::rpc::message::{Query, QueryReply};
    match c.client().query(Query::Fsck).await.unwrap() {
        QueryReply::Fsck { violations, .. } => {
            assert!(violations.is_empty(), "fsck: {violations:?}")
        }
        other => panic!("unexpected {other:?}"),
    }
}
