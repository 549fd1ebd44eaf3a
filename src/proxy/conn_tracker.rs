//! Live re-evaluation of admission: every established inbound connection (HBONE tunnel or
//! plaintext) is registered here with what it was admitted on, and whenever the store publishes
//! a new snapshot each one is re-checked — the policies, that its workload still exists and still
//! holds the address (an IP reused by another workload is not the same destination), and the
//! waypoint rule (a workload that gained a waypoint takes nothing that bypasses it). Those no
//! longer admitted are told to close.
//!
//! Invariants: a connection is registered from the moment it was allowed until its handler drops
//! the [`Registration`] (on every exit path); a revocation is sent at most once per connection.
//! The registry's mutex is taken briefly on register, deregister and to copy the entries (one
//! `Arc` each) for a re-check; evaluation runs outside it, never while evaluating a new
//! connection. Re-checks run on one task ([`ConnTracker::follow`]), which `app` runs on the
//! operators' runtime, off the data-plane workers, yielding every [`YIELD_EVERY`] evaluations so
//! that the other tasks there (xDS, metrics) keep their turn.
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

/// Evaluations between two yields of a re-check.
pub const YIELD_EVERY: usize = 256;

/// Why a tracked connection must close.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// A policy now denies it.
    Policy {
        policy: String,
        reason: &'static str,
    },
    /// The mesh changed under it: its workload left, its address moved, or a waypoint now stands
    /// in front of it.
    Mesh(String),
}

/// How an inbound connection arrived, for the rules that depend on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// Plaintext (15006): refused by a workload with a waypoint.
    Plaintext,
    /// An HBONE tunnel; `dialled` is the workload the tunnel was sent to when it is not the
    /// destination (a waypoint serving the destination from its own pod).
    Hbone { dialled: Option<WorkloadUid> },
    /// Either, with no rule depending on it (waypoints not enforced: ztunnel's default).
    Unchecked,
}

struct Tracked {
    conn: ConnCtx,
    dst: WorkloadUid,
    via: Via,
    revoke: watch::Sender<Option<Revocation>>,
}

/// The registry of established inbound connections.
#[derive(Default)]
pub struct ConnTracker {
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Tracked>>>,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Tracked>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracks an admitted connection to the workload `dst`.
    pub fn register(self: &Arc<Self>, conn: ConnCtx, dst: WorkloadUid, via: Via) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (revoke, revoked) = watch::channel(None);
        let t = Arc::new(Tracked {
            conn,
            dst,
            via,
            revoke,
        });
        self.lock().insert(id, t);
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
    /// ones no longer admitted and returns how many were revoked.
    pub fn recheck(&self, store: &Store) -> usize {
        let snapshot = store.load();
        let tracked = self.open();
        tracked
            .iter()
            .filter(|(id, t)| self.recheck_one(&snapshot, *id, t))
            .count()
    }

    /// [`Self::recheck`] that yields to the runtime every [`YIELD_EVERY`] connections.
    pub async fn recheck_cooperatively(&self, store: &Store) -> usize {
        let snapshot = store.load();
        let mut revoked = 0;
        for (i, (id, t)) in self.open().iter().enumerate() {
            if i > 0 && i % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
            revoked += usize::from(self.recheck_one(&snapshot, *id, t));
        }
        revoked
    }

    /// The tracked connections not yet revoked (copied out of the lock: one `Arc` each).
    fn open(&self) -> Vec<(u64, Arc<Tracked>)> {
        self.lock()
            .iter()
            .filter(|(_, t)| t.revoke.borrow().is_none())
            .map(|(id, t)| (*id, t.clone()))
            .collect()
    }

    /// Re-checks one connection; whether it was revoked.
    fn recheck_one(&self, snapshot: &crate::store::Snapshot, id: u64, t: &Tracked) -> bool {
        let Some(revocation) = unadmitted(snapshot, t) else {
            return false;
        };
        let why = match &revocation {
            Revocation::Policy { policy, reason } => format!("policy {policy}: {reason}"),
            Revocation::Mesh(why) => why.clone(),
        };
        tracing::info!(
            conn = id,
            peer = t.conn.peer.as_ref().map(|p| p.to_string()).as_deref(),
            src = %t.conn.src_ip,
            dst = %std::net::SocketAddr::new(t.conn.dst_ip, t.conn.dst_port),
            workload = %t.dst,
            %why,
            "a mesh change denies an established connection; closing it"
        );
        t.revoke.send_replace(Some(revocation));
        true
    }

    /// Re-checks after every new snapshot, until the store is gone. Starts with one re-check, so
    /// that a snapshot published before the subscription is not missed. Snapshots published
    /// during a re-check are coalesced into the next one.
    pub async fn follow(self: Arc<Self>, store: Arc<Store>) {
        let mut rx = store.subscribe();
        loop {
            if !self.is_empty() {
                self.recheck_cooperatively(&store).await;
            }
            if rx.changed().await.is_err() {
                return;
            }
            rx.borrow_and_update();
        }
    }
}

/// Why `t` is no longer admitted under `snapshot`, if it is not.
fn unadmitted(snapshot: &crate::store::Snapshot, t: &Tracked) -> Option<Revocation> {
    let Some(wl) = snapshot.workload(&t.dst) else {
        return Some(Revocation::Mesh(format!(
            "its destination workload {} left the mesh",
            t.dst
        )));
    };
    let dst_ip = t.conn.dst_ip.to_canonical();
    if !wl.addresses.iter().any(|a| a.to_canonical() == dst_ip) {
        return Some(Revocation::Mesh(format!(
            "its destination address {dst_ip} is no longer an address of workload {}/{}",
            wl.namespace, wl.name
        )));
    }
    match (&t.via, &t.conn.peer) {
        (Via::Plaintext, _) if wl.waypoint.is_some() => {
            return Some(Revocation::Mesh(format!(
                "workload {}/{} now has a waypoint; plaintext traffic would bypass it",
                wl.namespace, wl.name
            )));
        }
        (Via::Hbone { dialled }, Some(peer)) => {
            let dialled = dialled.as_ref().and_then(|u| snapshot.workload(u));
            if let Err(why) =
                super::route::waypoint::admits(snapshot, wl, peer, dialled.map(|w| &**w))
            {
                return Some(Revocation::Mesh(why));
            }
        }
        _ => {}
    }
    match rbac::evaluate(snapshot, wl, &t.conn).verdict {
        Verdict::Deny { policy, reason } => Some(Revocation::Policy {
            policy: policy.to_string(),
            reason: reason.as_str(),
        }),
        Verdict::Allow { .. } => None,
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
        let mut doomed = tracker.register(conn(9000), uid.clone(), Via::Plaintext);
        let mut spared = tracker.register(conn(8080), uid, Via::Plaintext);
        assert_eq!(tracker.recheck(&store), 0, "no policy: nothing revoked");

        store.apply(crate::localconfig::parse(&format!("{WORKLOAD}{DENY_9000}")).unwrap());
        assert_eq!(tracker.recheck(&store), 1);
        let r = doomed.revoked().await;
        assert!(
            matches!(&r, Revocation::Policy { policy, .. } if policy == "default/deny-9000"),
            "{r:?}"
        );
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
        let mut reg = tracker.register(
            conn(9000),
            WorkloadUid("c//v1/Pod/default/b".into()),
            Via::Plaintext,
        );
        let task = tokio::spawn(tracker.clone().follow(store.clone()));
        tokio::task::yield_now().await;
        // A config-file batch is the whole state: the workload stays in it.
        store.apply(crate::localconfig::parse(&format!("{WORKLOAD}{DENY_9000}")).unwrap());
        let r = tokio::time::timeout(std::time::Duration::from_secs(1), reg.revoked())
            .await
            .expect("revoked within a second");
        assert!(matches!(r, Revocation::Policy { .. }), "{r:?}");
        task.abort();
    }

    /// `b` (10.0.1.1), and a waypoint `wp` (10.0.1.9, service account `waypoint`); `extra` is
    /// appended to b's entry.
    fn mesh(b_ip: &str, extra: &str) -> String {
        format!(
            r#"
workloads:
- uid: c//v1/Pod/default/b
  name: b
  namespace: default
  serviceAccount: b
  workloadIps: ["{b_ip}"]
{extra}- uid: c//v1/Pod/default/wp
  name: wp
  namespace: default
  serviceAccount: waypoint
  workloadIps: ["10.0.1.9"]
"#
        )
    }

    const BEHIND_WP: &str = "  waypoint: { destination: \"/10.0.1.9\", hboneMtlsPort: 15008 }\n";

    fn with_peer(sa: &str) -> ConnCtx {
        ConnCtx {
            peer: Some(SpiffeId::new("cluster.local", "default", sa)),
            ..conn(8080)
        }
    }

    fn revocation(reg: &mut Registration) -> Option<Revocation> {
        reg.revoked.borrow_and_update().clone()
    }

    #[test]
    fn a_vanished_workload_or_a_moved_address_is_revoked() {
        let store = Store::new();
        store.apply(crate::localconfig::parse(&mesh("10.0.1.1", "")).unwrap());
        let tracker = Arc::new(ConnTracker::default());
        let uid = WorkloadUid("c//v1/Pod/default/b".into());
        let mut r = tracker.register(conn(8080), uid, Via::Plaintext);
        assert_eq!(tracker.recheck(&store), 0);
        // b now has another address; 10.0.1.1 is no longer the destination admitted.
        store.apply(crate::localconfig::parse(&mesh("10.0.1.2", "")).unwrap());
        assert_eq!(tracker.recheck(&store), 1);
        assert!(
            matches!(revocation(&mut r), Some(Revocation::Mesh(w)) if w.contains("no longer an address")),
        );
        // Gone from the mesh altogether.
        let mut r2 = tracker.register(
            conn(8080),
            WorkloadUid("c//v1/Pod/default/wp".into()),
            Via::Plaintext,
        );
        // A config-file batch is the whole state: wp is removed.
        let without_wp = crate::localconfig::parse(
            "workloads:\n- uid: c//v1/Pod/default/b\n  name: b\n  namespace: default\n  workloadIps: [\"10.0.1.1\"]\n",
        )
        .unwrap();
        store.apply(without_wp);
        assert_eq!(tracker.recheck(&store), 1);
        assert!(
            matches!(revocation(&mut r2), Some(Revocation::Mesh(w)) if w.contains("left the mesh")),
        );
    }

    #[test]
    fn a_waypoint_added_later_closes_what_bypasses_it() {
        let store = Store::new();
        store.apply(crate::localconfig::parse(&mesh("10.0.1.1", "")).unwrap());
        let tracker = Arc::new(ConnTracker::default());
        let uid = || WorkloadUid("c//v1/Pod/default/b".into());
        let mut plain = tracker.register(conn(8080), uid(), Via::Plaintext);
        let mut direct = tracker.register(with_peer("a"), uid(), Via::Hbone { dialled: None });
        let mut via_wp =
            tracker.register(with_peer("waypoint"), uid(), Via::Hbone { dialled: None });
        let mut on_wp = tracker.register(
            with_peer("a"),
            uid(),
            Via::Hbone {
                dialled: Some(WorkloadUid("c//v1/Pod/default/wp".into())),
            },
        );
        assert_eq!(tracker.recheck(&store), 0);
        store.apply(crate::localconfig::parse(&mesh("10.0.1.1", BEHIND_WP)).unwrap());
        assert_eq!(
            tracker.recheck(&store),
            2,
            "plaintext and the direct tunnel"
        );
        assert!(
            matches!(revocation(&mut plain), Some(Revocation::Mesh(w)) if w.contains("now has a waypoint"))
        );
        assert!(
            matches!(revocation(&mut direct), Some(Revocation::Mesh(w)) if w.contains("tunnels must come from"))
        );
        // The waypoint's own tunnel, and one dialled on the waypoint, stay.
        assert_eq!(revocation(&mut via_wp), None);
        assert_eq!(revocation(&mut on_wp), None);
    }
}
