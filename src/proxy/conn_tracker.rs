//! Live re-evaluation of authorization: every established inbound connection (HBONE tunnel or
//! plaintext) is registered here with what it was authorized on, and whenever the store publishes
//! a new snapshot each one is re-checked; those the new policies deny are told to close.
//!
//! Invariants: a connection is registered from the moment it was allowed until its handler drops
//! the [`Registration`] (on every exit path); a revocation is sent at most once per connection.
//! The registry's mutex is taken briefly on register, deregister and to copy the entries for a
//! re-check (evaluation runs outside it), never while evaluating a new connection. Re-checks run
//! on one task ([`ConnTracker::follow`]).
//!
//! Does not: close sockets itself (the copy loop selects on [`Registration::revoked`]), or diff
//! policy sets (every new snapshot re-checks every connection: one evaluation per tracked
//! connection per update).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::model::WorkloadUid;
use crate::rbac::{self, ConnCtx, Verdict};
use crate::store::Store;

/// Why a tracked connection must close: the policy that now denies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub policy: String,
    pub reason: &'static str,
}

#[derive(Clone)]
struct Tracked {
    conn: ConnCtx,
    dst: WorkloadUid,
    revoke: Arc<watch::Sender<Option<Revocation>>>,
}

/// The registry of established inbound connections.
#[derive(Default)]
pub struct ConnTracker {
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Tracked>>,
}

/// A connection's place in the registry; dropping it deregisters the connection.
pub struct Registration {
    id: u64,
    tracker: Arc<ConnTracker>,
    revoked: watch::Receiver<Option<Revocation>>,
}

impl Registration {
    /// Resolves when the policies now deny the connection (never, if they keep allowing it).
    pub async fn revoked(&mut self) -> Revocation {
        loop {
            if let Some(r) = self.revoked.borrow_and_update().clone() {
                return r;
            }
            if self.revoked.changed().await.is_err() {
                // The tracker dropped the sender: nothing will revoke this connection any more.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tracker.lock().remove(&self.id);
    }
}

impl ConnTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracks an allowed connection to the workload `dst`.
    pub fn register(self: &Arc<Self>, conn: ConnCtx, dst: WorkloadUid) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (revoke, revoked) = watch::channel(None);
        let revoke = Arc::new(revoke);
        self.lock().insert(id, Tracked { conn, dst, revoke });
        Registration {
            id,
            tracker: self.clone(),
            revoked,
        }
    }

    /// Connections currently tracked.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-checks every tracked connection against the store's current snapshot; revokes the
    /// denied ones and returns how many were revoked. A connection whose workload is gone is left
    /// alone (its socket fails on its own).
    pub fn recheck(&self, store: &Store) -> usize {
        let snapshot = store.load();
        // Evaluated outside the lock: registering new connections does not wait on re-checks.
        let tracked: Vec<(u64, Tracked)> = self
            .lock()
            .iter()
            .filter(|(_, t)| t.revoke.borrow().is_none())
            .map(|(id, t)| (*id, t.clone()))
            .collect();
        let mut revoked = 0;
        for (id, t) in &tracked {
            let Some(wl) = snapshot.workload(&t.dst) else {
                continue;
            };
            let d = rbac::evaluate(&snapshot, wl, &t.conn);
            if let Verdict::Deny { policy, reason } = d.verdict {
                tracing::info!(
                    conn = id,
                    policy = %policy,
                    reason = reason.as_str(),
                    peer = t.conn.peer.as_ref().map(|p| p.to_string()).as_deref(),
                    src = %t.conn.src_ip,
                    dst = %std::net::SocketAddr::new(t.conn.dst_ip, t.conn.dst_port),
                    workload = %t.dst,
                    "policy change denies an established connection; closing it"
                );
                t.revoke.send_replace(Some(Revocation {
                    policy: policy.to_string(),
                    reason: reason.as_str(),
                }));
                revoked += 1;
            }
        }
        revoked
    }

    /// Re-checks after every new snapshot, until the store is gone. Starts with one re-check, so
    /// that a snapshot published before the subscription is not missed.
    pub async fn follow(self: Arc<Self>, store: Arc<Store>) {
        let mut rx = store.subscribe();
        loop {
            if !self.is_empty() {
                self.recheck(&store);
            }
            if rx.changed().await.is_err() {
                return;
            }
            rx.borrow_and_update();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SpiffeId;

    const WORKLOAD: &str = r#"
workloads:
- uid: c//v1/Pod/default/b
  name: b
  namespace: default
  serviceAccount: b
  workloadIps: ["10.0.1.1"]
"#;

    const DENY_9000: &str = r#"
policies:
- name: deny-9000
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[ { destinationPorts: [9000] } ]]]
"#;

    fn conn(port: u16) -> ConnCtx {
        ConnCtx {
            peer: Some(SpiffeId::new("cluster.local", "default", "a")),
            src_ip: "10.0.0.1".parse().unwrap(),
            dst_ip: "10.0.1.1".parse().unwrap(),
            dst_port: port,
        }
    }

    #[tokio::test]
    async fn recheck_revokes_only_the_denied_and_drop_deregisters() {
        let store = Store::new();
        store.apply(crate::localconfig::parse(WORKLOAD).unwrap());
        let tracker = Arc::new(ConnTracker::default());
        let uid = WorkloadUid("c//v1/Pod/default/b".into());
        let mut doomed = tracker.register(conn(9000), uid.clone());
        let mut spared = tracker.register(conn(8080), uid);
        assert_eq!(tracker.recheck(&store), 0, "no policy: nothing revoked");

        store.apply(crate::localconfig::parse(&format!("{WORKLOAD}{DENY_9000}")).unwrap());
        assert_eq!(tracker.recheck(&store), 1);
        let r = doomed.revoked().await;
        assert_eq!(r.policy, "default/deny-9000");
        assert_eq!(tracker.recheck(&store), 0, "revoked at most once");
        let still_open =
            tokio::time::timeout(std::time::Duration::from_millis(50), spared.revoked());
        assert!(
            still_open.await.is_err(),
            "the other connection is not revoked"
        );

        drop(doomed);
        assert_eq!(tracker.len(), 1);
        drop(spared);
        assert!(tracker.is_empty());
    }

    #[tokio::test]
    async fn follow_revokes_after_a_store_update() {
        let store = Arc::new(Store::new());
        store.apply(crate::localconfig::parse(WORKLOAD).unwrap());
        let tracker = Arc::new(ConnTracker::default());
        let mut reg = tracker.register(conn(9000), WorkloadUid("c//v1/Pod/default/b".into()));
        let task = tokio::spawn(tracker.clone().follow(store.clone()));
        tokio::task::yield_now().await;
        // A config-file batch is the whole state: the workload stays in it.
        store.apply(crate::localconfig::parse(&format!("{WORKLOAD}{DENY_9000}")).unwrap());
        let r = tokio::time::timeout(std::time::Duration::from_secs(1), reg.revoked())
            .await
            .expect("revoked within a second");
        assert_eq!(r.policy, "default/deny-9000");
        task.abort();
    }
}
