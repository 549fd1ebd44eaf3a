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

pub(super) fn spawn(path: PathBuf, store: Arc<Store>) -> Result<JoinHandle<()>, LocalConfigError> {
    let err = |reason: String| LocalConfigError::Watch {
        path: path.clone(),
        reason,
    };
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| err(e.to_string()))?;
    let name = path
        .file_name()
        .ok_or_else(|| err("the path does not end in a file name".into()))?
        .to_owned();
    // The directory, not the file: a save by rename replaces the file's inode, and a watch on the old
    // inode would go quiet.
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
                warn!(error = %e, "local config watch error; re-reading the file");
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
    Ok(runtime.spawn(run(path, store, watcher, rx)))
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

async fn run(
    path: PathBuf,
    store: Arc<Store>,
    watcher: RecommendedWatcher,
    mut rx: mpsc::Receiver<()>,
) {
    // Owned by the task: aborting the task drops it, which ends the notifications.
    let _watcher = watcher;
    // The text last applied, to skip events that did not change it (touch, our own reads).
    let mut applied: Option<String> = None;
    while rx.recv().await.is_some() {
        loop {
            match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return,
                Err(_quiet) => break,
            }
        }
        reload(&path, &store, &mut applied).await;
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
