//! Test support: real nbdkit (and qemu) processes as NBD targets, each in its own tempdir,
//! on a Unix socket or a free loopback port, killed when dropped.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running target process serving `image`.
pub struct Target {
    child: Child,
    pub uri: String,
    pub sock: Option<PathBuf>,
}

impl Target {
    /// `nbdkit -U <dir>/nbd.sock -f --exit-with-parent <opts> file <image> <params>`.
    pub fn nbdkit_unix(dir: &Path, image: &Path, opts: &[&str], params: &[&str]) -> Target {
        let sock = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new("nbdkit");
        cmd.arg("-U").arg(&sock).args(["-f", "--exit-with-parent"]);
        cmd.args(opts).arg("file").arg(image).args(params);
        let child = spawn(cmd);
        let t = Target {
            child,
            uri: format!("nbd+unix:///?socket={}", sock.display()),
            sock: Some(sock.clone()),
        };
        wait_until("nbdkit socket accepts", || {
            UnixStream::connect(&sock).is_ok()
        });
        t
    }

    /// The same on 127.0.0.1 with a free port ([`csv_core::ports::free_port`]).
    pub fn nbdkit_tcp(image: &Path, opts: &[&str]) -> Target {
        let port = csv_core::ports::free_port().unwrap();
        let mut cmd = Command::new("nbdkit");
        cmd.args([
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-f",
            "--exit-with-parent",
        ]);
        cmd.args(opts).arg("file").arg(image);
        let child = spawn(cmd);
        let t = Target {
            child,
            uri: format!("nbd://127.0.0.1:{port}/"),
            sock: None,
        };
        wait_until("nbdkit port accepts", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        t
    }

    /// `qemu-nbd -f raw -k <dir>/qnbd.sock --persistent <image>` (a second real target).
    pub fn qemu_nbd_unix(dir: &Path, image: &Path) -> Target {
        Self::qemu_nbd(dir, image, None)
    }

    /// As [`Target::qemu_nbd_unix`], tracing its structured read chunks to `trace`.
    pub fn qemu_nbd_unix_traced(dir: &Path, image: &Path, trace: &Path) -> Target {
        Self::qemu_nbd(dir, image, Some(trace))
    }

    fn qemu_nbd(dir: &Path, image: &Path, trace: Option<&Path>) -> Target {
        let sock = dir.join("qnbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "--persistent", "--shared=16", "-k"])
            .arg(&sock)
            .arg(image);
        if let Some(trace) = trace {
            cmd.args(["--trace", "nbd_co_send_chunk_read*"])
                .stderr(std::fs::File::create(trace).unwrap());
        }
        let child = spawn(cmd);
        let t = Target {
            child,
            uri: format!("nbd+unix:///?socket={}", sock.display()),
            sock: Some(sock.clone()),
        };
        wait_until("qemu-nbd socket accepts", || {
            UnixStream::connect(&sock).is_ok()
        });
        t
    }

    /// Kills the process and waits for it (our own child, by its pid).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?} (is it installed?): {e}"))
}

/// Polls `cond` every 10 ms for up to 10 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A sparse image file of `size` bytes in `dir`.
pub fn image(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("lun.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// Sends a command to nbdkit's pause filter and waits for its acknowledgement.
pub fn pause_ctl(ctl: &Path, cmd: u8) {
    let mut s = UnixStream::connect(ctl).unwrap();
    s.write_all(&[cmd]).unwrap();
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(
        ack[0],
        cmd.to_ascii_uppercase(),
        "pause filter answered {ack:?}"
    );
}

/// Runs `qemu-io -f raw -r -c <cmd> <uri>`; true when the command succeeded.
pub fn qemu_io_ok(uri: &str, cmd: &str) -> bool {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", cmd, uri])
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success() && !text.contains("failed") && !text.contains("error")
}
