//! One certificate per identity, kept fresh: fetched on first need (or prefetched when a workload
//! of this node appears), renewed at half its lifetime, retried with backoff on CA failure while the
//! current certificate stays in use until it expires. Concurrent requests for one identity share
//! one fetch (one worker task per identity publishes into a watch channel).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ca_client::CaClient;
use super::cert::WorkloadCert;
use crate::model::SpiffeId;

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The state of one identity's certificate, observable for operators.
#[derive(Clone, Debug)]
pub enum CertState {
    Initializing,
    Available(Arc<WorkloadCert>),
    /// The last fetch failed; `current` is still served while valid.
    Unavailable {
        error: String,
        current: Option<Arc<WorkloadCert>>,
    },
}

impl CertState {
    /// The certificate to use now, if any is valid: an expired one is never presented, even
    /// the latest issued (its renewal may be stuck behind an unreachable CA).
    pub fn usable(&self, now: SystemTime) -> Option<Arc<WorkloadCert>> {
        match self {
            CertState::Available(c)
            | CertState::Unavailable {
                current: Some(c), ..
            } if c.is_valid_at(now) => Some(c.clone()),
            _ => None,
        }
    }
}

/// A summary for `/config_dump` and metrics.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertStatus {
    pub identity: String,
    /// `initializing`, `available`, `expired` (issued, but renewal has not replaced it in time)
    /// or `unavailable` (the last fetch failed).
    pub state: &'static str,
    pub error: Option<String>,
    /// Seconds since the Unix epoch.
    pub expiry: Option<u64>,
    /// The certificate served (or last served), with its chain and roots.
    #[serde(skip)]
    pub cert: Option<Arc<WorkloadCert>>,
}

/// Why no certificate could be had.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no certificate for {identity}: {reason}")]
pub struct NoCertificate {
    pub identity: SpiffeId,
    pub reason: String,
}

/// Keeps one identity's certificate while it lives ([`SecretManager::hold`]).
#[derive(Debug)]
pub struct CertHold {
    manager: Arc<SecretManager>,
    id: SpiffeId,
}

impl Drop for CertHold {
    fn drop(&mut self) {
        self.manager.release(&self.id);
    }
}

#[derive(Debug)]
struct Entry {
    state: watch::Receiver<CertState>,
    worker: JoinHandle<()>,
    /// Whether the last [`SecretManager::retain`] named it (or, since, a fetch or hold made it).
    wanted: bool,
    /// Live [`CertHold`]s: while any remains, the identity is kept even when no longer wanted.
    holds: usize,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

/// The certificate manager.
#[derive(Debug)]
pub struct SecretManager {
    ca: CaClient,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    /// Handshakes that needed a certificate of a kept identity and found none valid.
    unavailable: std::sync::atomic::AtomicU64,
    /// When that was last logged (at most once per [`UNAVAILABLE_LOG_EVERY`]).
    unavailable_logged: Mutex<Option<std::time::Instant>>,
}

/// How often, at most, a missing or expired certificate is logged at warn.
const UNAVAILABLE_LOG_EVERY: Duration = Duration::from_secs(10);

impl SecretManager {
    pub fn new(ca: CaClient) -> Arc<Self> {
        Arc::new(Self {
            ca,
            entries: Mutex::new(HashMap::new()),
            unavailable: Default::default(),
            unavailable_logged: Mutex::new(None),
        })
    }

    /// How many times a certificate was needed and none valid was held (metric
    /// `l4mesh_certificate_unavailable_total`): each is a failed handshake.
    pub fn unavailable_total(&self) -> u64 {
        self.unavailable.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts keeping a certificate for `id` (no-op if already kept). Needs a tokio runtime.
    pub fn prefetch(&self, id: &SpiffeId) -> watch::Receiver<CertState> {
        self.entry(&mut self.lock(), id).state.clone()
    }

    /// `id`'s entry in `entries` (the locked map), made now (its worker fetching) if missing.
    fn entry<'a>(&self, entries: &'a mut HashMap<SpiffeId, Entry>, id: &SpiffeId) -> &'a mut Entry {
        entries.entry(id.clone()).or_insert_with(|| {
            let (tx, rx) = watch::channel(CertState::Initializing);
            Entry {
                state: rx,
                worker: tokio::spawn(keep_fresh(self.ca.clone(), id.clone(), tx)),
                wanted: true,
                holds: 0,
            }
        })
    }

    /// Keeps `id`'s certificate (fetching it if needed) for as long as the returned hold lives,
    /// even once [`retain`](Self::retain) no longer names it: a draining pod's connections that
    /// were accepted but have not yet made their TLS handshake still present it.
    pub fn hold(self: &Arc<Self>, id: &SpiffeId) -> CertHold {
        self.entry(&mut self.lock(), id).holds += 1;
        CertHold {
            manager: self.clone(),
            id: id.clone(),
        }
    }

    /// The current certificate for `id`, waiting for the first fetch if needed. Fails when the CA
    /// could not issue one and no valid one is held.
    pub async fn fetch(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, NoCertificate> {
        let mut rx = self.prefetch(id);
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                CertState::Initializing => {}
                s => {
                    if let Some(c) = s.usable(SystemTime::now()) {
                        return Ok(c);
                    }
                    if let CertState::Unavailable { error, .. } = s {
                        return Err(NoCertificate {
                            identity: id.clone(),
                            reason: error,
                        });
                    }
                }
            }
            if rx.changed().await.is_err() {
                return Err(NoCertificate {
                    identity: id.clone(),
                    reason: "the identity was dropped while waiting".into(),
                });
            }
        }
    }

    /// The certificate to use now, without waiting; `None` (counted and logged) when the
    /// identity is kept but holds no valid certificate, expired ones included.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let state = self.lock().get(id)?.state.borrow().clone();
        let now = SystemTime::now();
        let usable = state.usable(now);
        if usable.is_none() {
            self.unavailable
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.log_unavailable(id, &state, now);
        }
        usable
    }

    fn log_unavailable(&self, id: &SpiffeId, state: &CertState, now: SystemTime) {
        let mut last = self
            .unavailable_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < UNAVAILABLE_LOG_EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
        let (held, error) = match state {
            CertState::Initializing => (None, None),
            CertState::Available(c) => (Some(c), None),
            CertState::Unavailable { error, current } => (current.as_ref(), Some(error.as_str())),
        };
        let expired_for = held.and_then(|c| now.duration_since(c.not_after).ok());
        tracing::warn!(
            identity = %id,
            ?expired_for,
            last_error = error,
            "no valid certificate to present: the handshake fails (the certificate expired or was never issued; is the CA reachable? see l4mesh_certificate_unavailable_total)"
        );
    }

    /// Keeps exactly `ids` (and those held): prefetches new ones, forgets the others.
    pub fn retain(&self, ids: &[SpiffeId]) {
        let mut entries = self.lock();
        entries.retain(|id, e| {
            if ids.contains(id) {
                return true;
            }
            e.wanted = false;
            if e.holds > 0 {
                return true;
            }
            tracing::info!(identity = %id, "dropping the certificate of an identity no longer on this node");
            false
        });
        for id in ids {
            self.entry(&mut entries, id).wanted = true;
        }
    }

    fn release(&self, id: &SpiffeId) {
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(id) else {
            return;
        };
        e.holds = e.holds.saturating_sub(1);
        if e.holds == 0 && !e.wanted {
            tracing::info!(identity = %id, "dropping the certificate of an identity no longer on this node (its last draining holder ended)");
            entries.remove(id);
        }
    }

    /// Every identity kept, with its state and expiry.
    pub fn status(&self) -> Vec<CertStatus> {
        let entries = self.lock();
        let mut out: Vec<CertStatus> = entries
            .iter()
            .map(|(id, e)| {
                let state = e.state.borrow().clone();
                let expiry = |c: &WorkloadCert| {
                    c.not_after
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs())
                };
                let (name, error, cert) = match &state {
                    CertState::Initializing => ("initializing", None, None),
                    CertState::Available(c) if !c.is_valid_at(SystemTime::now()) => {
                        ("expired", None, Some(c.clone()))
                    }
                    CertState::Available(c) => ("available", None, Some(c.clone())),
                    CertState::Unavailable { error, current } => {
                        ("unavailable", Some(error.clone()), current.clone())
                    }
                };
                CertStatus {
                    identity: id.to_string(),
                    state: name,
                    error,
                    expiry: cert.as_deref().and_then(expiry),
                    cert,
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

/// Fetches, publishes, sleeps until half-life, repeats; on failure keeps the current certificate
/// and retries with backoff (never sleeping past the moment it must be renewed).
async fn keep_fresh(ca: CaClient, id: SpiffeId, tx: watch::Sender<CertState>) {
    let mut retry = RETRY_MIN;
    loop {
        match ca.fetch(&id).await {
            Ok(cert) => {
                let cert = Arc::new(cert);
                // Half of the remaining life at receipt: CAs backdate not_before for clock skew,
                // which would otherwise make short-lived certificates renew at once.
                let now = SystemTime::now();
                let start = cert.not_before.max(now);
                let wait = super::cert::refresh_at(start, cert.not_after)
                    .duration_since(now)
                    .unwrap_or(Duration::ZERO);
                tracing::info!(identity = %id, expires_in = ?cert.not_after.duration_since(SystemTime::now()).unwrap_or_default(), renew_in = ?wait, "certificate issued");
                tx.send_replace(CertState::Available(cert));
                retry = RETRY_MIN;
                tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
            }
            Err(e) => {
                let current = tx.borrow().usable(SystemTime::now());
                tracing::warn!(identity = %id, error = %e, retry_in = ?retry, still_serving = current.is_some(), "certificate fetch failed");
                tx.send_replace(CertState::Unavailable {
                    error: e.to_string(),
                    current,
                });
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCa;

    fn manager(ttl: Duration) -> Arc<SecretManager> {
        let ca = Arc::new(LocalCa::generate("cluster.local").unwrap());
        SecretManager::new(CaClient::Local { ca, ttl })
    }

    #[tokio::test]
    async fn concurrent_fetches_share_one_certificate() {
        let m = manager(Duration::from_secs(3600));
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let (c1, c2) = tokio::join!(m.fetch(&id), m.fetch(&id));
        let (c1, c2) = (c1.unwrap(), c2.unwrap());
        assert!(Arc::ptr_eq(&c1, &c2), "one fetch for both callers");
        assert_eq!(c1.identity, id);
        let st = m.status();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].state, "available");
        assert!(st[0].expiry.is_some());
    }

    #[tokio::test]
    async fn renews_at_half_life_and_forgets() {
        let m = manager(Duration::from_secs(2));
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let first = m.fetch(&id).await.unwrap();
        // Renewal is due ~1 s after issue; well before the 2 s expiry a new one is current.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let second = m.current(&id).unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "renewed before expiry");
        assert!(second.not_after > first.not_after);
        m.retain(&[]);
        assert!(m.current(&id).is_none());
        assert!(m.status().is_empty());
    }

    /// A draining pod's hold keeps its certificate through a `retain` that no longer names it,
    /// until the hold ends; a fetch meanwhile does not make it wanted again.
    #[tokio::test]
    async fn a_hold_keeps_a_certificate_until_it_ends() {
        let m = manager(Duration::from_secs(3600));
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        m.retain(std::slice::from_ref(&id));
        let cert = m.fetch(&id).await.unwrap();
        let (first, second) = (m.hold(&id), m.hold(&id));
        m.retain(&[]);
        assert!(m.fetch(&id).await.is_ok());
        drop(first);
        let kept = m.current(&id).expect("kept while one hold remains");
        assert!(
            Arc::ptr_eq(&kept, &cert),
            "the same certificate, not a new fetch"
        );
        drop(second);
        assert!(m.current(&id).is_none(), "forgotten with its last hold");
        // Named again and held: the hold's end leaves it wanted.
        let hold = m.hold(&id);
        m.retain(std::slice::from_ref(&id));
        drop(hold);
        assert!(m.fetch(&id).await.is_ok());
        assert_eq!(m.status().len(), 1);
    }
}
