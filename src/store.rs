//! The mesh state as one immutable [`Snapshot`] behind an `ArcSwap`: connection handlers load it
//! without locks, the single writer publishes a whole new snapshot per [`Batch`] (one xDS response or
//! one config-file reload), so a reader never sees half an update.
//!
//! Indexes are persistent maps (`imbl`): a new snapshot shares all untouched structure with the old
//! one, so applying a batch costs O(batch · log N), not O(N). This module does no I/O.

mod snapshot;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::model::{Authorization, PolicyKey, Service, Workload};
pub use snapshot::Snapshot;

/// One change to the mesh state.
// Short-lived (moved into the snapshot): boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Upsert {
    Workload(Workload),
    Service(Service),
    Policy(Authorization),
}

/// A removal by xDS resource name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// A workload uid or a service `namespace/hostname` (the `istio.workload.Address` names).
    Address(String),
    Policy(PolicyKey),
}

/// Changes applied together, published as one snapshot.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub upserts: Vec<Upsert>,
    pub removals: Vec<Removal>,
    /// The upserts are the whole state: everything else is removed (a config-file reload).
    pub replace_all: bool,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty() && !self.replace_all
    }
}

/// What applying a batch did, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub version: u64,
    pub upserted: usize,
    pub removed: usize,
    /// Removals that named nothing held (harmless: xDS may remove what was never sent).
    pub unknown_removals: usize,
}

/// The holder of the current snapshot. Readers call [`Store::load`]; writers call [`Store::apply`].
pub struct Store {
    current: ArcSwap<Snapshot>,
    /// Serialises writers (rare); readers never touch it.
    writer: Mutex<()>,
    version_tx: watch::Sender<u64>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let (version_tx, _) = watch::channel(0);
        Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            writer: Mutex::new(()),
            version_tx,
        }
    }

    /// The current snapshot. Handlers take it once per connection and keep only the `Arc`s of the
    /// entities they need (holding the snapshot across a long copy would pin old indexes).
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies `batch` and publishes the result as one new snapshot.
    pub fn apply(&self, batch: Batch) -> ApplyStats {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current.load_full();
        let mut next = if batch.replace_all {
            Snapshot::default()
        } else {
            (*old).clone()
        };
        let mut stats = ApplyStats::default();
        for r in batch.removals {
            if next.remove(&r) {
                stats.removed += 1;
            } else {
                stats.unknown_removals += 1;
            }
        }
        for u in batch.upserts {
            next.upsert(u);
            stats.upserted += 1;
        }
        next.version = old.version + 1;
        stats.version = next.version;
        self.current.store(Arc::new(next));
        self.version_tx.send_replace(stats.version);
        stats
    }

    /// Notified with the new version after every apply (policy re-checks, readiness).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }
}
