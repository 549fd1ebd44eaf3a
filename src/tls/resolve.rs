//! Certificates presented at handshake time: asked from a [`CertSource`] on every handshake, with
//! the parsed signing key cached per certificate so a handshake costs a pointer comparison, not a
//! key parse. A rotation (a new `Arc<WorkloadCert>`) is picked up by the next handshake.

use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use super::{provider, CertSource, TlsError};
use crate::identity::WorkloadCert;

/// The rustls form of one [`WorkloadCert`], rebuilt only when the certificate changes. One cache
/// serves one identity; a resolver serving several identities keeps one per identity.
#[derive(Debug)]
pub struct CertifiedKeyCache {
    provider: Arc<CryptoProvider>,
    /// The certificate last converted (held, so its address cannot be reused) and its conversion.
    slot: Mutex<Option<(Arc<WorkloadCert>, Arc<CertifiedKey>)>>,
}

impl Default for CertifiedKeyCache {
    fn default() -> Self {
        Self::new()
    }
}

impl CertifiedKeyCache {
    /// An empty cache using the HBONE crypto provider ([`provider`], built once per process).
    pub fn new() -> Self {
        Self {
            provider: provider(),
            slot: Mutex::new(None),
        }
    }

    /// The `CertifiedKey` of `cert`: cached if `cert` is the same `Arc` as last time, else parsed
    /// (checking that the key matches the leaf) and cached.
    pub fn get(&self, cert: &Arc<WorkloadCert>) -> Result<Arc<CertifiedKey>, TlsError> {
        if let Some((cached, key)) = &*self.lock() {
            if Arc::ptr_eq(cached, cert) {
                return Ok(key.clone());
            }
        }
        // Parse outside the lock: concurrent handshakes keep using the cache meanwhile.
        let key = CertifiedKey::from_der(cert.chain.clone(), cert.key_der(), &self.provider)
            .map_err(|source| TlsError::Key {
                identity: cert.identity.clone(),
                error: Box::new(source),
            })?;
        let key = Arc::new(key);
        *self.lock() = Some((cert.clone(), key.clone()));
        Ok(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Arc<WorkloadCert>, Arc<CertifiedKey>)>> {
        // The slot is always a consistent pair: a panic elsewhere cannot leave it half-written.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Presents the current certificate of one [`CertSource`], as a server (`ResolvesServerCert`) and
/// as a client (`ResolvesClientCert`).
#[derive(Debug)]
pub struct SourceResolver {
    source: Arc<dyn CertSource>,
    keys: CertifiedKeyCache,
}

impl SourceResolver {
    /// A resolver presenting `source`'s current certificate on every handshake.
    pub fn new(source: Arc<dyn CertSource>) -> Self {
        Self {
            source,
            keys: CertifiedKeyCache::new(),
        }
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let cert = self.source.current()?;
        match self.keys.get(&cert) {
            Ok(key) => Some(key),
            Err(error) => {
                tracing::warn!(identity = %cert.identity, %error, "cannot present the workload certificate");
                None
            }
        }
    }
}

impl ResolvesServerCert for SourceResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for SourceResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
