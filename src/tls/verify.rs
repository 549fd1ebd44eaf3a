//! The SPIFFE verifiers: WebPKI chain validation to the mesh root (names ignored), then the
//! identity rule of each side. A refusal is a `rustls::Error` whose text names what was expected
//! and what was seen, so the handshake error the proxy logs explains itself.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::crl::{Checker, Revocation};
use super::TlsError;
use crate::identity::leaf_facts;
use crate::model::SpiffeId;

/// Client side: the server must chain to the roots (usage serverAuth), not be revoked, and carry
/// an expected ID.
#[derive(Debug)]
pub(super) struct ServerIdentity {
    roots: RootCertStore,
    expected: Vec<SpiffeId>,
    algs: WebPkiSupportedAlgorithms,
    revocation: Option<Arc<Revocation>>,
}

impl ServerIdentity {
    pub(super) fn new(
        roots: RootCertStore,
        expected: Vec<SpiffeId>,
        algs: WebPkiSupportedAlgorithms,
        revocation: Option<Arc<Revocation>>,
    ) -> Self {
        Self {
            roots,
            expected,
            algs,
            revocation,
        }
    }
}

impl ServerCertVerifier for ServerIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )
        .map_err(|e| clarify(e, "server"))?;
        not_revoked(
            self.revocation.as_deref(),
            end_entity,
            intermediates,
            &self.roots,
            now,
            Checker::Client,
        )?;
        let found = identity_of(end_entity)?;
        if !self.expected.contains(&found) {
            return Err(refuse(TlsError::UnexpectedServer {
                expected: self.expected.clone(),
                found,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: rustls's WebPKI client verifier (chain, usage clientAuth, validity), the
/// revocation lists, then the trust-domain rule. Client certificates are mandatory; no CA names
/// are hinted (a workload has exactly one certificate to offer).
#[derive(Debug)]
pub(super) struct ClientIdentity {
    webpki: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    /// The roots `webpki` verifies with, for the revocation check.
    roots: Arc<RootCertStore>,
    revocation: Option<Arc<Revocation>>,
}

impl ClientIdentity {
    pub(super) fn new(
        webpki: Arc<dyn ClientCertVerifier>,
        trust_domain: &str,
        roots: Arc<RootCertStore>,
        revocation: Option<Arc<Revocation>>,
    ) -> Self {
        Self {
            webpki,
            trust_domain: trust_domain.to_owned(),
            roots,
            revocation,
        }
    }
}

impl ClientCertVerifier for ClientIdentity {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| clarify(e, "client"))?;
        not_revoked(
            self.revocation.as_deref(),
            end_entity,
            intermediates,
            &self.roots,
            now,
            Checker::Server,
        )?;
        let found = identity_of(end_entity)?;
        if found.trust_domain != self.trust_domain {
            return Err(refuse(TlsError::ForeignClient {
                expected: self.trust_domain.clone(),
                found,
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The revocation check of a chain the handshake has verified: a revoked certificate is refused
/// as rustls's `Revoked` (the peer gets a `certificate_revoked` alert).
fn not_revoked(
    revocation: Option<&Revocation>,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    now: UnixTime,
    checker: Checker,
) -> Result<(), Error> {
    let Some(revocation) = revocation.filter(|r| !r.is_empty()) else {
        return Ok(());
    };
    let mut chain = Vec::with_capacity(intermediates.len() + 1);
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    match revocation.check(&chain, roots, now, checker) {
        Ok(()) => Ok(()),
        Err(webpki::Error::CertRevoked) => {
            Err(Error::InvalidCertificate(CertificateError::Revoked))
        }
        Err(e) => Err(refuse(TlsError::Revocation {
            role: match checker {
                Checker::Client => "server",
                Checker::Server => "client",
            },
            reason: format!("{e:?}"),
        })),
    }
}

fn identity_of(leaf: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    leaf_facts(leaf)
        .map(|(id, _, _)| id)
        .map_err(|e| refuse(TlsError::PeerCertificate(e)))
}

/// A refusal carrying our error, so its text reaches the caller's handshake error.
fn refuse(e: TlsError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// rustls's chain errors are clear for validity ("certificate expired: …"), terse for a foreign
/// root ("UnknownIssuer", "BadSignature"): say what those mean in a mesh.
fn clarify(e: Error, role: &'static str) -> Error {
    let reason = match &e {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown issuer",
        Error::InvalidCertificate(CertificateError::BadSignature) => {
            "a signature does not match the key of the CA named as issuer"
        }
        _ => return e,
    };
    refuse(TlsError::Untrusted { role, reason })
}
