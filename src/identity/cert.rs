//! A workload certificate: the key, the chain (leaf first), the trust roots, and the facts read from
//! the leaf (identity, validity) that rotation and verification need.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::model::SpiffeId;

/// Why a certificate (or chain) is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate is not valid PEM/DER: {0}")]
    Parse(String),
    #[error("certificate chain is empty: expected the leaf first, then intermediates, root last")]
    EmptyChain,
    #[error(
        "certificate chain holds only the leaf: expected the mesh root(s) as its last element"
    )]
    NoRoot,
    #[error("certificate has no spiffe:// URI SAN: expected exactly one SPIFFE identity")]
    NoSpiffeId,
    #[error("certificate carries {found}, expected {expected}")]
    WrongIdentity { expected: String, found: String },
    #[error("certificate chain does not verify against the trust root: {0}")]
    Untrusted(String),
    #[error("private key is not a PKCS#8 PEM key: {0}")]
    Key(String),
    #[error("the returned leaf does not fit the key the CSR was made with: {0}")]
    KeyMismatch(String),
}

/// A certificate for one identity, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: SpiffeId,
    /// Leaf first, then intermediates (the root is not sent).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The roots peers' certificates must chain to.
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Whether the certificate is within its validity period at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }
}

/// Half-way between `not_before` and `not_after`.
pub fn refresh_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + life / 2
}

/// Decodes every certificate of a PEM text.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut reader = std::io::BufReader::new(pem.as_bytes());
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut reader).collect();
    let certs = certs.map_err(|e| CertError::Parse(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::Parse("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// The SPIFFE identity and validity of a DER certificate.
pub fn leaf_facts(der: &[u8]) -> Result<(SpiffeId, SystemTime, SystemTime), CertError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let mut ids = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    ids.push(uri.to_string());
                }
            }
        }
    }
    let id = match ids.as_slice() {
        [one] => one
            .parse::<SpiffeId>()
            .map_err(|e| CertError::Parse(e.to_string()))?,
        _ => return Err(CertError::NoSpiffeId),
    };
    let secs = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    let v = cert.validity();
    Ok((
        id,
        secs(v.not_before.timestamp()),
        secs(v.not_after.timestamp()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_half_life() {
        let nb = UNIX_EPOCH + Duration::from_secs(1000);
        let na = nb + Duration::from_secs(86400);
        assert_eq!(refresh_at(nb, na), nb + Duration::from_secs(43200));
        // A certificate whose end is before its start refreshes at once.
        assert_eq!(refresh_at(na, nb), na);
    }
}
