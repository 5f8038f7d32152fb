//! fuse-frontend: the FUSE adapter over the protocol-agnostic [`Volume`].
//!
//! Each callback decodes the request, spawns a task on the tokio runtime that calls the
//! volume, and replies from there, so requests are served concurrently (a slow read
//! holds up nothing else). Reads and writes first run on the request thread itself until
//! they would wait (LUN I/O inline, like a passthrough file system), and only then move
//! to a task; `threads` request threads bound how many run inline at once. Errors
//! become errnos in one place ([`errno::errno`]).
//!
//! Cache policy (coherence across nodes):
//! - file data: every open file is `FOPEN_DIRECT_IO` (with parallel direct writes), so
//!   the kernel page cache never holds file data and no node can read stale pages; the
//!   volume's data locks make every read fresh. Shared writable mmap is therefore not
//!   offered (as with any direct-I/O FUSE file);
//! - attributes and entries: short TTLs (0.5 s) plus invalidation driven by the change
//!   feed ([`invalidate`]): a create, rename or unlink on any node drops the dentry on
//!   every node as soon as its replica applies it, well within 1 s;
//! - open: the volume reads the file's attributes linearizably, and the adapter drops
//!   the kernel's cached attributes before replying, so a file closed on another node
//!   shows its final size (close-to-open);
//! - a file removed on another node while this node's kernel still names it (a cached
//!   dentry, before the feed dropped it) answers open, getattr and setattr with ESTALE, not
//!   ENOENT: the kernel then looks the path up again (`LOOKUP_REVAL`) and reaches what the
//!   name means now, such as the file another node renamed over it.

pub mod errno;
mod fs;
mod invalidate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use csv_core::volume::Volume;

pub use fs::CsvFs;

/// How the volume is mounted.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// How long the kernel may cache a name lookup.
    pub entry_ttl: Duration,
    /// How long the kernel may cache attributes.
    pub attr_ttl: Duration,
    /// FUSE request threads. Reads and writes do their LUN I/O on these threads (other
    /// work runs on the tokio runtime), so this bounds the I/O queue depth served inline.
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            entry_ttl: Duration::from_millis(500),
            attr_ttl: Duration::from_millis(500),
            threads: 32,
        }
    }
}

/// What mounting or unmounting failed to do.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("cannot mount the volume at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot unmount {path}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A mounted volume; unmount it with [`FuseMount::unmount`] (dropping it also unmounts).
pub struct FuseMount {
    session: Option<fuser::BackgroundSession>,
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("path", &self.path)
            .finish()
    }
}

/// Mounts `volume` at `mountpoint` (cleaning up a stale mount there first). Requests
/// are served on `rt`.
pub fn mount(
    volume: Volume,
    mountpoint: &Path,
    rt: tokio::runtime::Handle,
    opts: MountOptions,
) -> Result<FuseMount, FuseError> {
    cleanup_stale_mount(mountpoint);
    std::fs::create_dir_all(mountpoint).map_err(|source| FuseError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    let feed = volume.subscribe();
    let fs = CsvFs::new(volume, rt, opts.clone());
    let notifier_slot = fs.notifier_slot();
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName("csvd".into()),
        fuser::MountOption::Subtype("csvd".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(opts.threads.max(1));
    cfg.clone_fd = opts.threads > 1;
    let session = fuser::spawn_mount(fs, mountpoint, &cfg).map_err(|source| FuseError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    let notifier = session.notifier();
    notifier_slot.set(notifier.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    invalidate::spawn(feed, notifier, stop.clone());
    tracing::info!(path = %mountpoint.display(), "volume mounted");
    Ok(FuseMount {
        session: Some(session),
        path: mountpoint.to_path_buf(),
        stop,
    })
}

impl FuseMount {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts and waits for the request loop to end. A busy mount is detached lazily.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => Ok(()),
            Err(source) => {
                cleanup_stale_mount(&self.path);
                if is_mounted(&self.path) {
                    Err(FuseError::Unmount {
                        path: self.path.clone(),
                        source,
                    })
                } else {
                    Ok(())
                }
            }
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// True if `path` is a mountpoint (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let want = p.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m == want)
}

/// Detaches a mount left behind by a dead process ("Transport endpoint is not
/// connected"), if there is one.
///
/// The mount's FUSE connection is aborted first (`umount2` with `MNT_FORCE | MNT_DETACH`:
/// every request waiting on it fails). A killed daemon cannot exit while one of its threads
/// waits in the kernel on that connection (an entry invalidation waits for a directory lock
/// that a client's request holds while it waits for the dead daemon's answer), and until it
/// exits it keeps its files, the Raft store among them, locked.
pub fn cleanup_stale_mount(path: &Path) {
    if !is_mounted(path) {
        return;
    }
    tracing::warn!(path = %path.display(), "removing a stale mount");
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call; umount2 has no
        // other memory-safety preconditions.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_FORCE | libc::MNT_DETACH) } == 0 {
            return;
        }
    }
    let ok = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(path)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(path)
            .status();
    }
}
