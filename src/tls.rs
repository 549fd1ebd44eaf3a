//! rustls configurations for HBONE: mutual TLS 1.3 between workloads, each side proving a SPIFFE
//! identity with a certificate that chains to the mesh root.
//!
//! Invariants (wire-facts §3): TLS 1.3 only; AES-GCM suites only (`TLS13_AES_128_GCM_SHA256`,
//! `TLS13_AES_256_GCM_SHA384`) from the aws-lc-rs provider; key exchange X25519MLKEM768 (when the
//! provider has it), X25519, secp256r1, in that order; ALPN `h2`. Names are never checked: the
//! client may dial an IP `ServerName`, SNI is not sent, and the server's verifier ignores DNS/IP
//! SANs. A client accepts a server only if its leaf's SPIFFE ID is one of those it expects; a server
//! requires a client certificate whose SPIFFE ID is in its trust domain. Session resumption is off:
//! every connection proves both identities afresh (HBONE connections are pooled and long-lived, so
//! full handshakes are rare).
//!
//! Each config is built once; certificates are looked up per handshake through [`CertSource`], so a
//! rotation applies to new connections without rebuilding anything, and the parsed signing key is
//! cached per certificate ([`CertifiedKeyCache`]).
//!
//! Not here: obtaining or renewing certificates (`identity`), choosing which identity to serve for a
//! destination IP, HTTP/2 and CONNECT (`proxy`), authorization of the peer identity (`rbac`).

pub mod crl;
mod resolve;
mod verify;

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::{NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier};
use rustls::{ClientConfig, CommonState, NamedGroup, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;

use crate::identity::{leaf_facts, CertError, SecretManager, WorkloadCert};
use crate::model::SpiffeId;

pub use crl::Revocation;
pub use resolve::{CertifiedKeyCache, SourceResolver};

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Where the TLS layer gets the current certificate at handshake time, so that a rotation takes
/// effect for new connections without rebuilding configs. `None` means "no certificate yet": the
/// handshake then fails (a server) or presents no certificate (a client, which the peer refuses).
pub trait CertSource: Send + Sync + std::fmt::Debug {
    fn current(&self) -> Option<Arc<WorkloadCert>>;
}

/// Why a TLS configuration could not be built, or why a peer was refused. A refusal by our
/// verifiers travels inside the handshake error as
/// `rustls::Error::InvalidCertificate(CertificateError::Other(..))`; [`refusal`] gets it back.
#[derive(thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error(
        "no trust root given: expected at least one mesh root certificate (the CA's answer ends with them)"
    )]
    NoRoots,
    #[error("trust root #{index} is not a usable certificate: {error}")]
    BadRoot { index: usize, error: rustls::Error },
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("no expected server identity: a client must say which SPIFFE IDs it accepts")]
    NoExpectedIdentity,
    #[error("certificate of {identity} cannot be used by TLS: {error}")]
    Key {
        identity: SpiffeId,
        error: Box<rustls::Error>,
    },
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate: {0}")]
    PeerCertificate(#[from] CertError),
    #[error("server identity {found} is not the expected {}", one_of(expected))]
    UnexpectedServer {
        expected: Vec<SpiffeId>,
        found: SpiffeId,
    },
    #[error(
        "client identity {found} is in trust domain {}, expected trust domain {expected}",
        found.trust_domain
    )]
    ForeignClient { expected: String, found: SpiffeId },
    #[error(
        "{role} certificate is not issued by the mesh root ({reason}): is the peer in another \
         mesh, or did the CA send the wrong roots?"
    )]
    Untrusted {
        role: &'static str,
        reason: &'static str,
    },
    #[error("{role} certificate chain could not be checked against the revocation lists (CRL_PATH): {reason}")]
    Revocation { role: &'static str, reason: String },
}

/// The message, not the structure: rustls formats `CertificateError::Other` with `{:?}`, and that
/// text is what a failed handshake logs.
impl std::fmt::Debug for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Our verifiers' refusal inside a handshake error (a `rustls::Error`, or the `io::Error` of
/// tokio-rustls wrapping one), so the proxy can classify it (blame the peer's identity, not the
/// network) and log it without rustls's wrapping.
pub fn refusal<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a TlsError> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
            e.downcast_ref::<rustls::Error>()
        {
            return other.0.downcast_ref::<TlsError>();
        }
        current = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

fn one_of(ids: &[SpiffeId]) -> String {
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    ids.join(" or ")
}

/// The crypto provider of every HBONE config: aws-lc-rs restricted to the suites and groups of
/// wire-facts §3. Built once; callers share it.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::LazyLock<Arc<CryptoProvider>> =
        std::sync::LazyLock::new(build_provider);
    PROVIDER.clone()
}

fn build_provider() -> Arc<CryptoProvider> {
    let base = aws_lc_rs::default_provider();
    let preferred = [
        NamedGroup::X25519MLKEM768,
        NamedGroup::X25519,
        NamedGroup::secp256r1,
    ];
    let kx_groups = preferred
        .iter()
        .filter_map(|name| base.kx_groups.iter().find(|g| g.name() == *name).copied())
        .collect();
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        kx_groups,
        ..base
    })
}

/// The current certificate of one identity, as the certificate manager keeps it: a rotation
/// shows up at the next handshake.
#[derive(Debug)]
pub struct ManagedCert {
    secrets: Arc<SecretManager>,
    identity: SpiffeId,
}

impl ManagedCert {
    pub fn new(secrets: Arc<SecretManager>, identity: SpiffeId) -> Arc<Self> {
        Arc::new(Self { secrets, identity })
    }
}

impl CertSource for ManagedCert {
    fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.secrets.current(&self.identity)
    }
}

/// The client side of HBONE: presents `source`'s current certificate, and accepts a server whose
/// chain verifies against `roots` and whose SPIFFE ID is one of `expected` (the destination
/// workload's identity, or the service's `subject_alt_names`) and whose chain no revocation list
/// of `revocation` revokes.
pub fn client_config(
    source: Arc<dyn CertSource>,
    roots: Vec<CertificateDer<'static>>,
    expected: Vec<SpiffeId>,
    revocation: Option<Arc<Revocation>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    if expected.is_empty() {
        return Err(TlsError::NoExpectedIdentity);
    }
    let provider = provider();
    let verifier = verify::ServerIdentity::new(
        root_store(roots)?,
        expected,
        provider.signature_verification_algorithms,
        revocation,
    );
    let resolver = SourceResolver::new(source);
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// The server side of HBONE: presents what `resolver` picks, requires a client certificate that
/// chains to `roots` and that no list of `revocation` revokes, and accepts only SPIFFE IDs of
/// `trust_domain`.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    roots: Vec<CertificateDer<'static>>,
    trust_domain: &str,
    revocation: Option<Arc<Revocation>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let roots = Arc::new(root_store(roots)?);
    let webpki =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let verifier = verify::ClientIdentity::new(webpki, trust_domain, roots, revocation);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The SPIFFE ID the peer proved in this (completed) handshake: the subject of RBAC and of the
/// `source_principal`/`destination_principal` telemetry.
pub fn peer_identity(conn: &CommonState) -> Result<SpiffeId, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    Ok(leaf_facts(leaf)?.0)
}

fn root_store(roots: Vec<CertificateDer<'static>>) -> Result<RootCertStore, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let mut store = RootCertStore::empty();
    for (index, root) in roots.into_iter().enumerate() {
        store
            .add(root)
            .map_err(|error| TlsError::BadRoot { index, error })?;
    }
    Ok(store)
}

#[cfg(test)]
mod tests;
