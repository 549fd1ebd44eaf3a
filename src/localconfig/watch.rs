//! The file watch: notify's callback (on its own thread) signals a tokio channel; one task debounces
//! the signals, re-reads the file, and applies it only when it is valid and has changed.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{in_file, parse, LocalConfigError};
use crate::store::{Batch, Store, Upsert};

/// Quiet time after the last event before re-reading: editors save in several steps.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Notifications that a file may have changed: debounced, robust to editors that replace the
/// file by rename and to Kubernetes ConfigMap symlink swaps. Shared with xds-testserver, which
/// watches its state file the same way.
pub struct FileWatch {
    path: PathBuf,
    // Dropping it ends the notifications.
    _watcher: RecommendedWatcher,
    rx: mpsc::Receiver<()>,
}

impl FileWatch {
    /// Starts watching `path` (its directory, filtered on its name).
    pub fn new(path: &Path) -> Result<FileWatch, LocalConfigError> {
        let err = |reason: String| LocalConfigError::Watch {
            path: path.to_owned(),
            reason,
        };
        let name = path
            .file_name()
            .ok_or_else(|| err("the path does not end in a file name".into()))?
            .to_owned();
        // The directory, not the file: a save by rename replaces the file's inode, and a watch on
        // the old inode would go quiet.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        // Capacity 1: a pending signal already stands for every change until the next read.
        let (tx, rx) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
            let relevant = match &res {
                Ok(event) => is_relevant(event, &name),
                Err(e) => {
                    warn!(error = %e, "file watch error; re-reading the file");
                    true
                }
            };
            if relevant {
                // Full means a reload is already pending; it will see this change too.
                let _ = tx.try_send(());
            }
        })
        .map_err(|e| err(e.to_string()))?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| err(format!("watching {}: {e}", dir.display())))?;
        Ok(FileWatch {
            path: path.to_owned(),
            _watcher: watcher,
            rx,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resolves after a change once the file has been quiet for a moment; `None` if the watch ended.
    pub async fn changed(&mut self) -> Option<()> {
        self.rx.recv().await?;
        loop {
            match tokio::time::timeout(DEBOUNCE, self.rx.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return None,
                Err(_quiet) => return Some(()),
            }
        }
    }
}

pub(super) fn spawn(path: PathBuf, store: Arc<Store>) -> Result<JoinHandle<()>, LocalConfigError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| LocalConfigError::Watch {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let watch = FileWatch::new(&path)?;
    Ok(runtime.spawn(run(watch, store)))
}

/// Whether an event in the directory may have changed the file.
fn is_relevant(event: &Event, name: &OsStr) -> bool {
    let kind = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        // Opens and reads, our own included: re-reading on them would loop.
        EventKind::Access(_) => false,
        _ => true,
    };
    kind && (event.paths.is_empty()
        || event.paths.iter().any(|p| {
            p.file_name().is_some_and(|n| {
                // `..data` and friends: a Kubernetes ConfigMap volume swaps a symlink, not the file.
                n == name || n.to_string_lossy().starts_with("..")
            })
        }))
}

async fn run(mut watch: FileWatch, store: Arc<Store>) {
    // The text last applied, to skip events that did not change it (touch, our own reads).
    let mut applied: Option<String> = None;
    while watch.changed().await.is_some() {
        reload(watch.path(), &store, &mut applied).await;
    }
}

async fn reload(path: &Path, store: &Store, applied: &mut Option<String>) {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(text) => text,
        Err(error) => {
            let e = LocalConfigError::Read {
                path: path.to_owned(),
                error,
            };
            warn!("{e}; keeping the last good local config");
            return;
        }
    };
    if applied.as_deref() == Some(text.as_str()) {
        debug!(path = %path.display(), "local config unchanged");
        return;
    }
    match parse(&text) {
        Ok(batch) => {
            let (workloads, services, policies) = counts(&batch);
            let stats = store.apply(batch);
            info!(
                path = %path.display(),
                version = stats.version,
                workloads,
                services,
                policies,
                "local config reloaded"
            );
            *applied = Some(text);
        }
        Err(e) => warn!("{}; keeping the last good local config", in_file(path, e)),
    }
}

fn counts(batch: &Batch) -> (usize, usize, usize) {
    batch
        .upserts
        .iter()
        .fold((0, 0, 0), |(w, s, p), u| match u {
            Upsert::Workload(_) => (w + 1, s, p),
            Upsert::Service(_) => (w, s + 1, p),
            Upsert::Policy(_) => (w, s, p + 1),
        })
}
