//! The state file watch: notify's callback (on its own thread) signals a tokio channel; one task
//! debounces the signals (~100 ms), re-reads the file and, when it is valid and has changed, replaces
//! the served state, which pushes the difference to every client. The parent directory is watched and
//! filtered on the file name, so saves that write another file and rename it over this one (editors,
//! `mv`, Kubernetes ConfigMap volumes and their `..data` symlink swap) are seen.
//!
//! A file that reads as blank is taken for a write in progress and ignored (`{}` is the empty state).
//!
//! Not here: parsing (l4mesh's `LocalConfig`, through `state::Resources`), the push itself.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::server::Shared;
use crate::state::Resources;
use crate::{Error, Kind};

/// Quiet time after the last event before re-reading: editors save in several steps.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Starts watching `path`; the task ends when the server shuts down. The file is assumed loaded.
pub(crate) fn spawn(path: PathBuf, shared: Arc<Shared>) -> Result<JoinHandle<()>, Error> {
    let err = |reason: String| Error::Watch {
        path: path.clone(),
        reason,
    };
    let name = path
        .file_name()
        .ok_or_else(|| err("the path does not end in a file name".into()))?
        .to_owned();
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
                warn!(error = %e, "state file watch error; re-reading the file");
                true
            }
        };
        if relevant {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| err(e.to_string()))?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| err(format!("watching {}: {e}", dir.display())))?;
    let applied = std::fs::read_to_string(&path).ok();
    Ok(tokio::spawn(async move {
        let stopped = shared.stopped();
        tokio::select! {
            () = run(&path, &shared, watcher, rx, applied) => {}
            () = stopped => debug!(path = %path.display(), "state file watch stopped"),
        }
    }))
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
            p.file_name()
                .is_some_and(|n| n == name || n.to_string_lossy().starts_with(".."))
        }))
}

async fn run(
    path: &Path,
    shared: &Shared,
    watcher: RecommendedWatcher,
    mut rx: mpsc::Receiver<()>,
    mut applied: Option<String>,
) {
    // Owned here: dropping it (task end or abort) ends the notifications.
    let _watcher = watcher;
    while rx.recv().await.is_some() {
        loop {
            match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return,
                Err(_quiet) => break,
            }
        }
        reload(path, shared, &mut applied).await;
    }
}

async fn reload(path: &Path, shared: &Shared, applied: &mut Option<String>) {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(text) => text,
        Err(e) => {
            warn!(path = %path.display(), "cannot read the state file: {e}; keeping the previous state");
            return;
        }
    };
    if text.trim().is_empty() {
        // Most likely a write in progress (truncate, then write); an empty state is `{}`.
        warn!(
            path = %path.display(),
            "the state file is empty; keeping the previous state (write `{{}}` to serve nothing)"
        );
        return;
    }
    if applied.as_deref() == Some(text.as_str()) {
        debug!(path = %path.display(), "state file unchanged");
        return;
    }
    match Resources::from_yaml(&text) {
        Ok(resources) => {
            let (addresses, policies) = (
                resources.count(Kind::Address),
                resources.count(Kind::Authorization),
            );
            shared.replace(resources);
            info!(path = %path.display(), addresses, policies, "state file reloaded; pushing the changes");
            *applied = Some(text);
        }
        Err(e) => warn!(
            path = %path.display(),
            "invalid state file: {e}; keeping the previous state"
        ),
    }
}
