//! Starts processes for a process that holds files open on FUSE mounts.
//!
//! Starting a program closes the child's copies of its parent's close-on-exec descriptors,
//! and the kernel sends a FUSE `FLUSH` for every such file on a FUSE mount (csvd answers it
//! with an fsync). `posix_spawn` returns only after the child has executed, so a process
//! with open files on csvd mounts waits, on each start, for every node those files live
//! on: seconds, or as long as a paused node stays paused. The chaos harness is such a
//! process (its `fuse` workers keep files open on every mount), and it restarts nodes.
//!
//! A [`Spawner`] is a small helper process (`csvctl __spawner`) started *before* any such
//! file is opened; it starts the programs it is asked to over a pipe, so no start ever
//! closes a FUSE file. Its children are reaped by the kernel (SIGCHLD ignored).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde::{Deserialize, Serialize};

/// The argument that turns `csvctl` into a spawner.
pub const SPAWNER_ARG: &str = "__spawner";

/// What to start: a program with arguments, stdout and stderr appended to `log`, in a
/// process group of its own, stdin from /dev/null.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnSpec {
    program: Vec<u8>,
    args: Vec<Vec<u8>>,
    log: PathBuf,
}

impl SpawnSpec {
    /// The program and arguments of `cmd` (its environment and other settings are not
    /// carried over: the spawner's own are used).
    pub fn from_command(cmd: &Command, log: &Path) -> Self {
        SpawnSpec {
            program: cmd.get_program().as_bytes().to_vec(),
            args: cmd.get_args().map(|a| a.as_bytes().to_vec()).collect(),
            log: log.to_path_buf(),
        }
    }

    fn start(&self) -> std::io::Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(OsString::from_vec(self.program.clone()))
            .args(self.args.iter().map(|a| OsString::from_vec(a.clone())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()?;
        Ok(child.id())
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum SpawnReply {
    Started(u32),
    Failed(String),
}

/// A running spawner process.
pub struct Spawner {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Spawner {
    /// Starts `csvctl` (the binary at `csvctl`) as a spawner.
    pub fn start(csvctl: &Path) -> std::io::Result<Spawner> {
        let mut child = Command::new(csvctl)
            .arg(SPAWNER_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()?;
        let (Some(to), Some(from)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(std::io::Error::other("spawner pipes missing"));
        };
        Ok(Spawner {
            child,
            to,
            from: BufReader::new(from),
        })
    }

    /// Starts `spec` through the spawner; returns the new process's pid.
    pub fn spawn(&mut self, spec: &SpawnSpec) -> std::io::Result<u32> {
        let mut line = serde_json::to_vec(spec).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.to.write_all(&line)?;
        self.to.flush()?;
        let mut answer = String::new();
        if self.from.read_line(&mut answer)? == 0 {
            return Err(std::io::Error::other("the spawner exited"));
        }
        match serde_json::from_str(&answer).map_err(std::io::Error::other)? {
            SpawnReply::Started(pid) => Ok(pid),
            SpawnReply::Failed(e) => Err(std::io::Error::other(e)),
        }
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        // Closing its stdin ends the loop; the processes it started live on.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The spawner's loop (`csvctl __spawner`): one JSON [`SpawnSpec`] per line on stdin, one
/// reply per line on stdout, until stdin closes.
pub fn serve() -> std::io::Result<()> {
    // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety preconditions;
    // this process is single-threaded and installs no handlers.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
    }
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let reply = match serde_json::from_str::<SpawnSpec>(&line) {
            Ok(spec) => match spec.start() {
                Ok(pid) => SpawnReply::Started(pid),
                Err(e) => SpawnReply::Failed(format!(
                    "cannot start {}: {e}",
                    String::from_utf8_lossy(&spec.program)
                )),
            },
            Err(e) => SpawnReply::Failed(format!("bad request: {e}")),
        };
        let mut bytes = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        out.write_all(&bytes)?;
        out.flush()?;
    }
    Ok(())
}
