//! The state file watch: l4mesh's own [`FileWatch`] (debounced, robust to rename-replace saves and
//! Kubernetes ConfigMap symlink swaps) wakes one task, which re-reads the file and, when it is valid
//! and has changed, replaces the served state, which pushes the difference to every client.
//!
//! A file that reads as blank is taken for a write in progress and ignored (`{}` is the empty state).
//!
//! Not here: parsing (l4mesh's `LocalConfig`, through `state::Resources`), the push itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use l4mesh::localconfig::FileWatch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::server::Shared;
use crate::state::Resources;
use crate::{Error, Kind};

/// Starts watching `path`; the task ends when the server shuts down. The file is assumed loaded.
pub(crate) fn spawn(path: PathBuf, shared: Arc<Shared>) -> Result<JoinHandle<()>, Error> {
    let mut watch = FileWatch::new(&path).map_err(|e| Error::Watch {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut applied = std::fs::read_to_string(&path).ok();
    Ok(tokio::spawn(async move {
        let stopped = shared.stopped();
        let run = async {
            while watch.changed().await.is_some() {
                reload(&path, &shared, &mut applied).await;
            }
        };
        tokio::select! {
            () = run => {}
            () = stopped => debug!(path = %path.display(), "state file watch stopped"),
        }
    }))
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
