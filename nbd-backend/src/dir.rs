//! An [`ExportProvider`] serving the regular files under a local directory.
//!
//! Export names are paths relative to the root (`vms/a.vhd`); names that are empty, absolute,
//! or contain `..`/`.` components are unknown. `.vhd` files are decoded, others served raw.
//! Every connection to the same name gets the same device while any connection holds it, so a
//! FLUSH on one connection covers all of them and VHD allocation is serialised per export.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Weak};

use crate::export::{
    BlockDevice, BoxFuture, ExportError, ExportProvider, FileBacking, OpenPurpose, device_for_file,
};

/// Serves the files under `root`.
pub struct DirProvider {
    root: PathBuf,
    read_only: bool,
    open: tokio::sync::Mutex<HashMap<String, Weak<dyn BlockDevice>>>,
}

impl DirProvider {
    pub fn new(root: impl Into<PathBuf>, read_only: bool) -> Self {
        Self {
            root: root.into(),
            read_only,
            open: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    fn path_of(&self, name: &str) -> Option<PathBuf> {
        let rel = Path::new(name);
        let plain = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        plain.then(|| self.root.join(rel))
    }
}

fn list_files(root: &Path, dir: &Path, depth: usize, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_file() {
            if let Some(name) = path.strip_prefix(root).ok().and_then(|p| p.to_str()) {
                out.push(name.to_owned());
            }
        } else if ft.is_dir() && depth > 0 {
            list_files(root, &path, depth - 1, out);
        }
    }
}

impl ExportProvider for DirProvider {
    fn list(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            let root = self.root.clone();
            let listed = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                list_files(&root, &root, 4, &mut out);
                out.sort();
                out
            })
            .await;
            listed.unwrap_or_default()
        })
    }

    fn open<'a>(
        &'a self,
        name: &'a str,
        _purpose: OpenPurpose,
    ) -> BoxFuture<'a, Result<Arc<dyn BlockDevice>, ExportError>> {
        Box::pin(async move {
            let path = self
                .path_of(name)
                .ok_or_else(|| ExportError::NotFound(name.to_owned()))?;
            let mut open = self.open.lock().await;
            if let Some(dev) = open.get(name).and_then(Weak::upgrade) {
                return Ok(dev);
            }
            let read_only = self.read_only;
            let opened = tokio::task::spawn_blocking(move || {
                let meta = std::fs::metadata(&path)?;
                if !meta.is_file() {
                    return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
                }
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(!read_only)
                    .open(&path)?;
                FileBacking::new(file)
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    ExportError::NotFound(name.to_owned())
                } else {
                    ExportError::Open {
                        name: name.to_owned(),
                        source: e,
                    }
                }
            })?;
            let dev = device_for_file(Arc::new(opened), name, read_only).await?;
            open.retain(|_, w| w.strong_count() > 0);
            open.insert(name.to_owned(), Arc::downgrade(&dev));
            Ok(dev)
        })
    }
}
