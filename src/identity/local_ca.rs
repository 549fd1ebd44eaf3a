//! An in-process certificate authority: a self-signed root (or a plug-in root/intermediate and its
//! key) that mints SPIFFE workload certificates and signs CSRs exactly as Istio's CA does.
//!
//! Three users share this one implementation: l4mesh's local mode (`FAKE_CA`, no CA server), the
//! xds-testserver's `IstioCertificateService`, and tests that need certificates.
//!
//! Invariants: every leaf has an empty subject, exactly one URI SAN (the SPIFFE ID), EKU
//! serverAuth+clientAuth, `CA:FALSE`, a random serial, and a validity starting one minute in the
//! past (clock skew between nodes). Chains are returned leaf first, root last (Istio's order).
//! A plug-in CA is checked at load: it must be a CA, its key must match, and a certificate it issues
//! must verify against its root.
//!
//! Not here: deciding *who* may obtain which identity (the caller authenticates; the CA signs what it
//! is asked for, in any trust domain), revocation, persistence, rotation of the CA itself.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};

use super::cert::{leaf_facts, pem_certs, CertError, WorkloadCert};
use crate::model::{IdentityError, SpiffeId};

/// Validity of a generated root.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far in the past a certificate starts, so that peers with a slightly late clock accept it.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The last instant X.509 can express (9999-12-31T23:59:59Z), in seconds since the epoch.
const MAX_ASN1_SECS: u64 = 253_402_300_799;

/// Why the CA could not be built or could not sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid trust domain {0:?}: expected a DNS-like name such as cluster.local")]
    TrustDomain(String, #[source] IdentityError),
    #[error("CA certificate: expected a PEM CERTIFICATE, {0}")]
    CaCert(String),
    #[error("CA private key: expected a PEM PKCS#8 or SEC1 (EC PRIVATE KEY) key, {0}")]
    CaKey(String),
    #[error("CA certificate {subject} is not a CA: expected basicConstraints CA:TRUE")]
    NotCa { subject: String },
    #[error("the CA private key does not match the public key of CA certificate {subject}")]
    KeyMismatch { subject: String },
    #[error("CA chain: {0}")]
    Chain(String),
    #[error("a certificate issued by this CA does not verify against its root: {0}")]
    SelfTest(#[source] CertError),
    #[error("CSR: expected a PEM CERTIFICATE REQUEST with a valid signature, {0}")]
    Csr(String),
    #[error("CSR asks for [{found}], expected exactly one URI SAN {expected}")]
    CsrIdentity { expected: String, found: String },
    #[error("validity {0}: expected a period between 1970 and 9999")]
    Validity(String),
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("the certificate just issued is unreadable: {0}")]
    Issued(#[from] CertError),
}

/// A certificate authority held in memory: its signing key, the certificates between a leaf and
/// the root, and the root peers must trust.
pub struct LocalCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate if it is an intermediate, then the rest of its chain; root excluded.
    intermediates: Vec<CertificateDer<'static>>,
    intermediates_pem: Vec<String>,
    root: CertificateDer<'static>,
    root_pem: String,
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa")
            .field("trust_domain", &self.trust_domain)
            .field("intermediates", &self.intermediates.len())
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// A fresh self-signed ECDSA P-256 root (CA:TRUE, keyCertSign), valid 10 years: local mode and
    /// tests, where nothing outside the process needs to trust it in advance.
    pub fn generate(trust_domain: &str) -> Result<LocalCa, CaError> {
        check_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params
            .distinguished_name
            .push(DnType::CommonName, "l4mesh local CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        set_validity(&mut params, earlier(now, CLOCK_SKEW), later(now, ROOT_TTL)?)?;
        let cert = params.self_signed(&key)?;
        Ok(LocalCa {
            trust_domain: trust_domain.to_owned(),
            root: cert.der().clone(),
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            intermediates: Vec::new(),
            intermediates_pem: Vec::new(),
        })
    }

    /// A plug-in CA (Istio's `cacerts`): a root or intermediate certificate and its key (PEM;
    /// PKCS#8 or SEC1 EC key), plus the chain up to the root when it is an intermediate
    /// (`chain_pem` may be empty for a root, and may start with the CA certificate itself).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        chain_pem: &str,
        trust_domain: &str,
    ) -> Result<LocalCa, CaError> {
        use x509_parser::prelude::*;
        check_trust_domain(trust_domain)?;
        let mut certs = pem_certs(cert_pem).map_err(|e| CaError::CaCert(e.to_string()))?;
        let ca_der = certs.remove(0);
        if !chain_pem.trim().is_empty() {
            certs.extend(pem_certs(chain_pem).map_err(|e| CaError::Chain(e.to_string()))?);
        }
        certs.retain(|c| *c != ca_der);

        let (_, ca) = X509Certificate::from_der(&ca_der)
            .map_err(|e| CaError::CaCert(format!("could not parse it: {e}")))?;
        let subject = ca.subject().to_string();
        let is_ca = matches!(ca.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            return Err(CaError::NotCa { subject });
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::CaKey(e.to_string()))?;
        if rcgen::PublicKeyData::der_bytes(&key) != &ca.public_key().subject_public_key.data[..] {
            return Err(CaError::KeyMismatch { subject });
        }

        let root = match certs.pop() {
            Some(root) => root,
            None => ca_der.clone(),
        };
        let (_, root_cert) = X509Certificate::from_der(&root)
            .map_err(|e| CaError::Chain(format!("could not parse the root: {e}")))?;
        if root_cert.subject().as_raw() != root_cert.issuer().as_raw() {
            return Err(CaError::Chain(format!(
                "expected the chain to end with a self-signed root, but {} is issued by {}{}",
                root_cert.subject(),
                root_cert.issuer(),
                if chain_pem.trim().is_empty() {
                    " (an intermediate needs its chain up to the root)"
                } else {
                    ""
                }
            )));
        }
        let mut intermediates = Vec::new();
        if ca_der != root {
            intermediates.push(ca_der.clone());
        }
        intermediates.extend(certs);

        let issuer = Issuer::from_ca_cert_der(&ca_der, key)
            .map_err(|e| CaError::CaCert(format!("unusable as an issuer: {e}")))?;
        let ca = LocalCa {
            trust_domain: trust_domain.to_owned(),
            issuer,
            intermediates_pem: intermediates
                .iter()
                .map(|c| der_to_pem("CERTIFICATE", c))
                .collect(),
            intermediates,
            root_pem: der_to_pem("CERTIFICATE", &root),
            root,
        };
        ca.self_test()?;
        Ok(ca)
    }

    /// The root peers must trust, PEM (for `CA_ROOT_CA`, or Istio's `root-cert.pem`).
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// The root peers must trust, DER (for the TLS configurations).
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root.clone()]
    }

    /// The trust domain of this mesh (what servers require of their clients).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Mints a key and a leaf for `id`, valid from one minute ago for `ttl`.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCert, CaError> {
        let now = SystemTime::now();
        self.issue_with_validity(id, earlier(now, CLOCK_SKEW), later(now, ttl)?)
    }

    /// Like [`LocalCa::issue`] with an explicit validity period: for tests of expired or
    /// not-yet-valid certificates.
    pub fn issue_with_validity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = leaf_params(id, not_before, not_after)?;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let (identity, not_before, not_after) = leaf_facts(leaf.der())?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(WorkloadCert {
            identity,
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            roots: self.roots(),
            not_before,
            not_after,
        })
    }

    /// Signs a PEM CSR as Istio's `CreateCertificate` does: the CSR's single URI SAN must be `id`
    /// (the identity the caller was authenticated for); everything else in the certificate is the
    /// CA's choice. Returns the PEM chain leaf first, then intermediates, root last.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let expected = id.to_string();
        let sans: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(describe_san)
            .collect();
        if sans.len() != 1 || sans[0] != expected {
            return Err(CaError::CsrIdentity {
                expected,
                found: sans.join(", "),
            });
        }
        let now = SystemTime::now();
        csr.params = leaf_params(id, earlier(now, CLOCK_SKEW), later(now, ttl)?)?;
        let leaf = csr.signed_by(&self.issuer)?;
        let mut chain = Vec::with_capacity(self.intermediates_pem.len() + 2);
        chain.push(leaf.pem());
        chain.extend(self.intermediates_pem.iter().cloned());
        chain.push(self.root_pem.clone());
        Ok(chain)
    }

    /// A revocation list signed by this CA (PEM `X509 CRL`) that revokes the certificates it
    /// issued with these serial numbers (DER `INTEGER` contents), valid from a minute ago for a
    /// day: what `CRL_PATH` reads.
    pub fn revocation_list(&self, serials: &[Vec<u8>]) -> Result<String, CaError> {
        let now = SystemTime::now();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let at = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| epoch + Duration::from_secs(d.as_secs()))
                .map_err(|_| CaError::Validity(format!("{t:?}")))
        };
        let this_update = at(earlier(now, CLOCK_SKEW))?;
        let params = rcgen::CertificateRevocationListParams {
            this_update,
            next_update: at(later(now, Duration::from_secs(86_400))?)?,
            crl_number: random_serial(),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: this_update,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    /// Issues a throw-away certificate and verifies it against the root: catches a plug-in CA
    /// whose names, key or validity would make every workload certificate fail at handshake time.
    fn self_test(&self) -> Result<(), CaError> {
        let id = SpiffeId::new(&self.trust_domain, "l4mesh-system", "ca-self-test");
        let cert = self.issue(&id, CLOCK_SKEW)?;
        verify_chain(&cert.chain, &cert.roots, UnixTime::now()).map_err(CaError::SelfTest)
    }
}

/// Generates a fresh ECDSA P-256 key and a PEM CSR with an empty subject and one URI SAN = `id`:
/// what a node proxy sends to Istio's CA.
pub fn csr_for(id: &SpiffeId) -> Result<(String, PrivatePkcs8KeyDer<'static>), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![uri_san(id)?];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((csr, PrivatePkcs8KeyDer::from(key.serialize_der())))
}

/// Builds a [`WorkloadCert`] from a CA's PEM chain (leaf first … root last; an entry may hold
/// several certificates) and the key the CSR was made with. Refuses a leaf for another identity, a
/// chain that does not verify against `roots` now, and a key that is not the leaf's, so that a bad
/// answer from the CA fails here rather than in every later handshake.
pub fn workload_cert_from_chain(
    id: &SpiffeId,
    chain: &[String],
    key: PrivatePkcs8KeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
) -> Result<WorkloadCert, CertError> {
    let mut certs = Vec::new();
    for pem in chain {
        certs.extend(pem_certs(pem)?);
    }
    let Some(leaf) = certs.first() else {
        return Err(CertError::EmptyChain);
    };
    let (identity, not_before, not_after) = leaf_facts(leaf)?;
    if identity != *id {
        return Err(CertError::WrongIdentity {
            expected: id.to_string(),
            found: identity.to_string(),
        });
    }
    verify_chain(&certs, &roots, UnixTime::now())?;
    // The root is not sent in handshakes: peers have it already.
    while certs.len() > 1 && certs.last().is_some_and(|c| roots.contains(c)) {
        certs.pop();
    }
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(
        vec![certs[0].clone()],
        PrivateKeyDer::Pkcs8(key.clone_key()),
        &provider,
    )
    .map_err(|e| CertError::KeyMismatch(e.to_string()))?;
    Ok(WorkloadCert {
        identity,
        chain: certs,
        key,
        roots,
        not_before,
        not_after,
    })
}

/// Verifies `chain` (leaf first) against `roots` at `now`, for both TLS client and server use
/// (HBONE uses a workload certificate in both roles).
fn verify_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<(), CertError> {
    let (leaf, intermediates) = chain.split_first().ok_or(CertError::EmptyChain)?;
    let anchors = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Untrusted(format!("a trust root is unreadable: {e}")))?;
    if anchors.is_empty() {
        return Err(CertError::Untrusted("no trust root was given".into()));
    }
    let leaf =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| CertError::Parse(e.to_string()))?;
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| CertError::Untrusted(describe_webpki(&e, roots.len())))?;
    }
    Ok(())
}

fn describe_webpki(e: &webpki::Error, roots: usize) -> String {
    match e {
        webpki::Error::CertExpired { time, not_after } => format!(
            "a certificate expired at {} (UNIX seconds), it is now {}",
            not_after.as_secs(),
            time.as_secs()
        ),
        webpki::Error::CertNotValidYet { time, not_before } => format!(
            "a certificate is valid only from {} (UNIX seconds), it is now {}",
            not_before.as_secs(),
            time.as_secs()
        ),
        webpki::Error::UnknownIssuer => {
            format!("not issued by any of the {roots} trusted root(s) (unknown issuer)")
        }
        webpki::Error::InvalidSignatureForPublicKey => format!(
            "not issued by any of the {roots} trusted root(s) (a signature does not match the \
             key of the CA named as issuer: another CA with the same name?)"
        ),
        other => format!("{other:?}"),
    }
}

fn leaf_params(
    id: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![uri_san(id)?];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    set_validity(&mut params, not_before, not_after)?;
    Ok(params)
}

fn uri_san(id: &SpiffeId) -> Result<SanType, CaError> {
    let uri = id.to_string();
    let ia5 = rcgen::string::Ia5String::try_from(uri).map_err(CaError::Sign)?;
    Ok(SanType::URI(ia5))
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::URI(uri) => uri.as_str().to_owned(),
        SanType::DnsName(dns) => format!("DNS:{}", dns.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

fn check_trust_domain(trust_domain: &str) -> Result<(), CaError> {
    format!("spiffe://{trust_domain}/ns/n/sa/s")
        .parse::<SpiffeId>()
        .map(|_| ())
        .map_err(|e| CaError::TrustDomain(trust_domain.to_owned(), e))
}

/// Sets the validity without naming the `time` crate: rcgen's epoch plus a duration.
fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), CaError> {
    let since_epoch = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .ok()
            .filter(|d| d.as_secs() <= MAX_ASN1_SECS)
            .map(|d| Duration::from_secs(d.as_secs()))
            .ok_or_else(|| CaError::Validity(format!("{t:?}")))
    };
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch(not_before)?;
    params.not_after = epoch + since_epoch(not_after)?;
    Ok(())
}

fn earlier(t: SystemTime, by: Duration) -> SystemTime {
    t.checked_sub(by).unwrap_or(UNIX_EPOCH)
}

fn later(t: SystemTime, by: Duration) -> Result<SystemTime, CaError> {
    t.checked_add(by)
        .ok_or_else(|| CaError::Validity(format!("now + {by:?}")))
}

/// 16 random bytes, positive and without a leading zero byte (RFC 5280: at most 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// PEM text of one DER object (`label`: `CERTIFICATE`, `PRIVATE KEY`…), 64-column base64 as
/// every PEM reader expects, for tools that read files (Envoy, operators) and `/config_dump`.
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

#[cfg(test)]
mod tests;
