//! [`open_lun`]: turns the configured LUN spec into a backend.
//!
//! `nbd://...` and `nbd+unix://...` open an [`NbdLun`]; `file:PATH` or any other string is a
//! path to a regular file or block device, opened as a [`FileLun`].

use std::sync::Arc;

use super::{FileLun, FileLunOptions, Lun, LunError, NbdLun, NbdOptions};

/// How [`open_lun`] opens a LUN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LunOpenOptions {
    /// For paths: O_DIRECT and read-only.
    pub file: FileLunOptions,
    /// For NBD targets: timeouts.
    pub nbd: NbdOptions,
}

/// Opens the LUN named by `spec`: `nbd://host:port/export`, `nbd+unix:///export?socket=/path`,
/// `file:/path` or a plain path (`/dev/sdb`, `/srv/lun.img`).
pub async fn open_lun(spec: &str, opts: &LunOpenOptions) -> Result<Arc<dyn Lun>, LunError> {
    if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
        return Ok(Arc::new(NbdLun::connect(spec, opts.nbd).await?));
    }
    let path = spec.strip_prefix("file:").unwrap_or(spec).to_string();
    let file_opts = opts.file;
    let lun = tokio::task::spawn_blocking(move || FileLun::open(path, file_opts))
        .await
        .map_err(|e| LunError::Io {
            op: "open",
            offset: 0,
            source: std::io::Error::other(e),
        })?
        .map_err(|source| LunError::Io {
            op: "open",
            offset: 0,
            source,
        })?;
    Ok(Arc::new(lun))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn paths_open_as_files_and_bad_specs_fail_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let lun = open_lun(path.to_str().unwrap(), &LunOpenOptions::default())
            .await
            .unwrap();
        assert_eq!(lun.size(), 1 << 20);
        assert!(lun.describe().starts_with("file:"));
        let spec = format!("file:{}", path.display());
        assert_eq!(
            open_lun(&spec, &LunOpenOptions::default())
                .await
                .unwrap()
                .size(),
            1 << 20
        );
        let missing = dir.path().join("nope");
        let err = open_lun(missing.to_str().unwrap(), &LunOpenOptions::default())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, LunError::Io { op: "open", .. }), "{err}");
        let sock = dir.path().join("no.sock");
        let err = open_lun(
            &format!("nbd+unix:///?socket={}", sock.display()),
            &LunOpenOptions::default(),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, LunError::PathUnreachable { .. }), "{err}");
    }
}
