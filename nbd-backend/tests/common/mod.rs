//! Shared harness for tests with real NBD clients: an in-process server on a unix socket in a
//! temp dir, and helpers to run client processes and check their results.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use nbd_backend::dir::DirProvider;
use nbd_backend::{NbdServer, ServerConfig};
use tempfile::TempDir;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

pub struct TestServer {
    pub server: NbdServer,
    pub sock: PathBuf,
    task: JoinHandle<()>,
}

impl TestServer {
    /// Serves `exports` on `<tmp>/<sock_name>`.
    pub fn start(exports: &Path, sock: PathBuf, read_only: bool, config: ServerConfig) -> Self {
        let listener = UnixListener::bind(&sock).expect("bind unix socket");
        let server = NbdServer::new(Arc::new(DirProvider::new(exports, read_only)), config, None);
        let s = server.clone();
        let task = tokio::spawn(async move {
            s.serve_unix(listener).await.expect("serve");
        });
        Self { server, sock, task }
    }

    /// `nbd+unix:///NAME?socket=...`
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// A URI template with `{}` in place of the export name (for the Python script).
    pub fn uri_template(&self) -> String {
        self.uri("{}")
    }

    pub async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(20), self.server.shutdown())
            .await
            .expect("server shut down in time");
        self.task.await.expect("accept loop ended");
    }
}

/// A temp dir with an `exports/` directory and a server on `nbd.sock`.
pub struct Fixture {
    pub tmp: TempDir,
    pub exports: PathBuf,
}

impl Fixture {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let exports = tmp.path().join("exports");
        std::fs::create_dir(&exports).expect("mkdir exports");
        Self { tmp, exports }
    }

    pub fn export(&self, name: &str) -> PathBuf {
        self.exports.join(name)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn serve(&self, read_only: bool) -> TestServer {
        let sock = self.path(if read_only { "ro.sock" } else { "nbd.sock" });
        TestServer::start(&self.exports, sock, read_only, ServerConfig::default())
    }
}

/// Runs a client process to completion (60 s cap) and returns its output.
pub async fn run(program: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"))
}

/// Runs a client and panics with its output unless it exits 0; returns stdout.
pub async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// qemu-io prints failures on stdout with exit 0 in some versions: check both.
pub async fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let out = run_ok("qemu-io", &args).await;
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

/// Deterministic pseudo-random bytes (xorshift), seeded: the seed is printed by callers.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn seed() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    println!("seed = {seed}");
    seed
}
