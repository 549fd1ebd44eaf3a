//! Certificate revocation (`CRL_PATH`, as ztunnel): a file of revocation lists, re-read when it
//! changes; peers whose chain a list revokes are refused at the handshake, and live HBONE
//! connections that such a peer opened are closed when a new list revokes it.
//!
//! The file is PEM (every `X509 CRL` block) or one DER list; empty means nothing is revoked. It is
//! usually a ConfigMap volume (Istio's chart mounts `istio-ca-crl` at
//! `/var/run/secrets/istio/crl/ca-crl.pem`), so it is watched through its directory. A missing
//! file is waited for; a malformed one is logged and the previous lists stay (none at start).
//!
//! Checking follows ztunnel: every certificate of the chain ([`RevocationCheckDepth::Chain`]); a
//! certificate no list speaks for is allowed (lists are published per issuing CA); a list past
//! its next update still counts. A live connection is re-checked at the time it was established,
//! so that a certificate expiring later never reads as revoked.
//!
//! Cost: nothing without `CRL_PATH`. With it, one more chain verification per handshake while
//! lists are loaded, one map entry per live HBONE connection, and on each reload one verification
//! per live connection (on a blocking thread).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::CommonState;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::watch;
use webpki::{
    CertRevocationList, ExpirationPolicy, KeyUsage, OwnedCertRevocationList, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy,
};

/// How often the file is re-read even without a notification: a watch cannot start on a
/// directory that does not exist yet, and notifications can be lost.
const POLL: Duration = Duration::from_secs(30);

/// Why the revocation lists could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("reading the revocation lists {path}: {error}")]
    Read {
        path: PathBuf,
        // In the message, not a source: said once.
        error: std::io::Error,
    },
    #[error("{path}: expected PEM blocks of type X509 CRL (or one DER list), found {found}")]
    Pem { path: PathBuf, found: String },
    #[error("{path}: revocation list #{index} is not a usable X.509 CRL: {reason}")]
    Parse {
        path: PathBuf,
        index: usize,
        reason: String,
    },
}

/// Which end of a connection checked the peer: ztunnel's `reporter` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Checker {
    /// We dialled: the peer is the server (`reporter="source"`).
    Client,
    /// We accepted: the peer is the client (`reporter="destination"`).
    Server,
}

impl Checker {
    fn usage(self) -> KeyUsage {
        match self {
            Checker::Client => KeyUsage::server_auth(),
            Checker::Server => KeyUsage::client_auth(),
        }
    }

    fn index(self) -> usize {
        match self {
            Checker::Client => 0,
            Checker::Server => 1,
        }
    }

    /// ztunnel's `reporter` label value.
    pub fn reporter(self) -> &'static str {
        match self {
            Checker::Client => "source",
            Checker::Server => "destination",
        }
    }
}

/// Counts per [`Checker`], for ztunnel's `istio_crl_*` metrics.
#[derive(Debug, Default)]
pub struct CrlCounts {
    /// Handshakes refused and live connections closed because a list revokes the peer's chain.
    pub rejections: [AtomicU64; 2],
    /// Live connections that could not be tracked for later revocation: the peer presented no
    /// certificate (which mutual TLS does not let through; counted should it ever happen).
    pub untracked: [AtomicU64; 2],
}

impl CrlCounts {
    pub fn rejections(&self, c: Checker) -> u64 {
        self.rejections[c.index()].load(Ordering::Relaxed)
    }

    pub fn untracked(&self, c: Checker) -> u64 {
        self.untracked[c.index()].load(Ordering::Relaxed)
    }
}

/// What a reload saw of the file.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Nothing,
    Missing,
    Content(Vec<u8>),
}

/// One live HBONE connection, re-checked when the lists change.
struct Tracked {
    chain: Vec<CertificateDer<'static>>,
    roots: Arc<Vec<CertificateDer<'static>>>,
    established: UnixTime,
    checker: Checker,
    revoked: watch::Sender<bool>,
}

/// The revocation lists of this l4mesh and the connections they may close.
pub struct Revocation {
    path: PathBuf,
    lists: ArcSwap<Vec<CertRevocationList<'static>>>,
    /// Bumped at every change of `lists`: a connection registered after a handshake checked with
    /// older lists is checked again.
    generation: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Tracked>>>,
    next_id: AtomicU64,
    /// What the last reload saw: a reload that sees the same changes nothing (and says
    /// nothing).
    seen: Mutex<Seen>,
    pub counts: CrlCounts,
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation")
            .field("path", &self.path)
            .field("lists", &self.lists.load().len())
            .finish_non_exhaustive()
    }
}

/// A live connection's registration: `revoked` turns true when a new list revokes its peer. Dropping
/// it ends the tracking.
pub struct Tracking {
    revoked: watch::Receiver<bool>,
    owner: Option<(Arc<Revocation>, u64)>,
}

impl Tracking {
    /// Resolves when the peer's chain is revoked; never for an untracked connection.
    pub async fn revoked(&mut self) {
        if self.revoked.wait_for(|r| *r).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// [`Tracking::revoked`] of a connection that may not be tracked (no `CRL_PATH`): never then.
    pub async fn revoked_if_any(tracking: Option<&mut Tracking>) {
        match tracking {
            Some(t) => t.revoked().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        if let Some((rev, id)) = self.owner.take() {
            rev.live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        }
    }
}

impl Revocation {
    /// Reads `path` once (a missing or malformed file is logged: nothing is revoked until a good
    /// one appears). [`Revocation::follow`] keeps it current.
    pub fn load(path: PathBuf) -> Arc<Revocation> {
        let rev = Arc::new(Revocation {
            path,
            lists: ArcSwap::from_pointee(Vec::new()),
            generation: AtomicU64::new(0),
            live: Mutex::default(),
            next_id: AtomicU64::new(0),
            seen: Mutex::new(Seen::Nothing),
            counts: CrlCounts::default(),
        });
        rev.reload();
        rev
    }

    /// How many lists are loaded.
    pub fn lists(&self) -> usize {
        self.lists.load().len()
    }

    /// The lists' generation now: pass it to [`Revocation::track`] from before the handshake.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Re-reads the file on every change of it (and every [`POLL`] as a backstop) until the
    /// returned future is dropped; a changed set of lists is applied, then live connections are
    /// checked against it.
    pub async fn follow(self: Arc<Self>) {
        let mut watch = match crate::localconfig::FileWatch::new(&self.path) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("{e}; re-reading the revocation lists every {POLL:?} instead");
                None
            }
        };
        loop {
            // First once the watch is set up: a change since `load` is not missed.
            let rev = self.clone();
            // The file read, webpki and the re-check are blocking work; a reload is rare.
            let _ = tokio::task::spawn_blocking(move || rev.reload()).await;
            let changed = async {
                match watch.as_mut() {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                c = changed => if c.is_none() { watch = None; },
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Reads the file and, when its content changed and parses, applies it and re-checks live
    /// connections. A missing or malformed file keeps the lists in force (none at start).
    pub fn reload(&self) {
        let read = std::fs::read(&self.path);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let data = match read {
            Ok(d) => d,
            Err(error) => {
                let missing = error.kind() == std::io::ErrorKind::NotFound;
                if !(missing && *seen == Seen::Missing) {
                    let e = CrlError::Read {
                        path: self.path.clone(),
                        error,
                    };
                    tracing::warn!("{e}; the revocation lists in force stay");
                }
                *seen = if missing {
                    Seen::Missing
                } else {
                    Seen::Nothing
                };
                return;
            }
        };
        if matches!(&*seen, Seen::Content(c) if *c == data) {
            return;
        }
        let parsed = parse(&self.path, &data);
        *seen = Seen::Content(data);
        drop(seen);
        match parsed {
            Ok(lists) => {
                tracing::info!(path = %self.path.display(), lists = lists.len(), "certificate revocation lists loaded");
                self.lists.store(Arc::new(lists));
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.recheck();
            }
            Err(e) => tracing::error!("{e}; the lists in force stay until the file is fixed"),
        }
    }

    /// Whether no list is loaded (the handshake check is then skipped).
    pub fn is_empty(&self) -> bool {
        self.lists.load().is_empty()
    }

    /// Refuses `chain` (leaf first, as presented) if a loaded list revokes one of its
    /// certificates. The chain has already been verified against `roots` by the handshake.
    pub fn check(
        &self,
        chain: &[CertificateDer<'_>],
        roots: &rustls::RootCertStore,
        now: UnixTime,
        checker: Checker,
    ) -> Result<(), webpki::Error> {
        let lists = self.lists.load();
        if lists.is_empty() {
            return Ok(());
        }
        let result = verify(chain, &roots.roots, now, checker, &lists);
        if matches!(result, Err(webpki::Error::CertRevoked)) {
            self.counts.rejections[checker.index()].fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Tracks an established connection (`tls` is its handshake state, `roots` the trust roots it
    /// was verified with, `since` the [`Revocation::generation`] from before the handshake): a
    /// later list that revokes its peer's chain fires [`Tracking::revoked`].
    pub fn track(
        self: &Arc<Self>,
        tls: &CommonState,
        roots: Arc<Vec<CertificateDer<'static>>>,
        checker: Checker,
        since: u64,
    ) -> Tracking {
        let (tx, rx) = watch::channel(false);
        let chain: Vec<CertificateDer<'static>> = tls
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let established = UnixTime::now();
        if chain.is_empty() {
            self.counts.untracked[checker.index()].fetch_add(1, Ordering::Relaxed);
            tracing::warn!("the HBONE peer presented no certificate: its connection is not tracked for revocation");
            return Tracking {
                revoked: rx,
                owner: None,
            };
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Tracked {
            chain,
            roots,
            established,
            checker,
            revoked: tx,
        });
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, entry.clone());
        // A reload since the handshake may have re-checked the live connections before this one
        // was among them (the lists are stored before the generation moves, so they are seen).
        if self.generation() != since {
            self.close_if_revoked(&entry);
        }
        Tracking {
            revoked: rx,
            owner: Some((self.clone(), id)),
        }
    }

    /// How many live connections are tracked.
    pub fn tracked(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Signals `t` (and counts it, once) if the current lists revoke its chain, judged at the
    /// time it was established.
    fn close_if_revoked(&self, t: &Tracked) -> bool {
        if *t.revoked.borrow() {
            return false;
        }
        let lists = self.lists.load();
        if lists.is_empty() {
            return false;
        }
        let anchors: Vec<_> = t
            .roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        let revoked = matches!(
            verify(&t.chain, &anchors, t.established, t.checker, &lists),
            Err(webpki::Error::CertRevoked)
        );
        if revoked && t.revoked.send_if_modified(|r| !std::mem::replace(r, true)) {
            self.counts.rejections[t.checker.index()].fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Signals every live connection whose chain the current lists revoke. The verifications run
    /// outside the map's lock: connections come and go meanwhile.
    fn recheck(&self) {
        let live: Vec<Arc<Tracked>> = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let closed = live.iter().filter(|t| self.close_if_revoked(t)).count();
        if closed > 0 {
            tracing::warn!(
                connections = closed,
                "closing HBONE connections whose peer certificate is now revoked"
            );
        }
    }
}

/// webpki's chain verification with the lists, as ztunnel configures it.
fn verify(
    chain: &[CertificateDer<'_>],
    anchors: &[rustls_pki_types::TrustAnchor<'_>],
    now: UnixTime,
    checker: Checker,
    lists: &[CertRevocationList<'static>],
) -> Result<(), webpki::Error> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(webpki::Error::BadDer);
    };
    let refs: Vec<&CertRevocationList<'_>> = lists.iter().collect();
    let revocation = RevocationOptionsBuilder::new(&refs)
        .map_err(|_| webpki::Error::BadDer)?
        .with_depth(RevocationCheckDepth::Chain)
        .with_status_policy(UnknownStatusPolicy::Allow)
        .with_expiration_policy(ExpirationPolicy::Ignore)
        .build();
    let algs = super::provider().signature_verification_algorithms;
    webpki::EndEntityCert::try_from(leaf)?
        .verify_for_usage(
            algs.all,
            anchors,
            intermediates,
            now,
            checker.usage(),
            Some(revocation),
            None,
        )
        .map(|_| ())
}

/// PEM (every block must be an `X509 CRL`; none at all means no lists) or one DER list.
fn parse(path: &Path, data: &[u8]) -> Result<Vec<CertRevocationList<'static>>, CrlError> {
    let text = data.trim_ascii();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let ders: Vec<Vec<u8>> = if text.starts_with(b"-----BEGIN") {
        let mut ders = Vec::new();
        for item in rustls_pemfile::read_all(&mut &data[..]) {
            match item {
                Ok(rustls_pemfile::Item::Crl(der)) => ders.push(der.to_vec()),
                Ok(other) => {
                    return Err(CrlError::Pem {
                        path: path.to_owned(),
                        found: format!("a block of another type ({})", pem_kind(&other)),
                    })
                }
                Err(e) => {
                    return Err(CrlError::Pem {
                        path: path.to_owned(),
                        found: format!("unreadable PEM ({e:?})"),
                    })
                }
            }
        }
        ders
    } else {
        // DER as is: its last bytes may well look like whitespace.
        vec![data.to_vec()]
    };
    ders.iter()
        .enumerate()
        .map(|(i, der)| {
            OwnedCertRevocationList::from_der(der)
                .map(CertRevocationList::from)
                .map_err(|e| CrlError::Parse {
                    path: path.to_owned(),
                    index: i + 1,
                    reason: format!("{e:?}"),
                })
        })
        .collect()
}

fn pem_kind(item: &rustls_pemfile::Item) -> &'static str {
    match item {
        rustls_pemfile::Item::X509Certificate(_) => "CERTIFICATE",
        rustls_pemfile::Item::Csr(_) => "CERTIFICATE REQUEST",
        rustls_pemfile::Item::Pkcs1Key(_)
        | rustls_pemfile::Item::Pkcs8Key(_)
        | rustls_pemfile::Item::Sec1Key(_) => "PRIVATE KEY",
        rustls_pemfile::Item::SubjectPublicKeyInfo(_) => "PUBLIC KEY",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests;
