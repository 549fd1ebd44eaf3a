//! The server's mesh CA and its gRPC serving certificate: a fresh ECDSA P-256 root (or a CA loaded
//! from PEM), and a P-256 serving certificate it signs for `localhost`, `istiod.istio-system.svc`,
//! the listen IP and any extra names, so that a standard gRPC client that trusts the root verifies it.
//!
//! Not here: client certificates (no mTLS), certificate rotation (the serving certificate lives as
//! long as the process), the Istio CA service.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use tonic::transport::{Identity, ServerTlsConfig};

use crate::{Error, TlsConfig};

/// What the gRPC listener needs to serve TLS.
pub(crate) struct ServingTls {
    /// The tonic server config with the serving certificate.
    pub server: ServerTlsConfig,
    /// The root certificate clients should trust (PEM).
    pub root_pem: String,
}

/// Makes (or loads) the CA, issues the serving certificate, and writes the root where asked.
pub(crate) fn build(config: &TlsConfig, listen: IpAddr) -> Result<ServingTls, Error> {
    let tls_err = |what: &str, e: rcgen::Error| Error::Tls(format!("{what}: {e}"));
    let (issuer, root_pem, chain_extra) = match &config.ca {
        Some(ca) => {
            let key = KeyPair::from_pem(&ca.key_pem)
                .map_err(|e| tls_err("cannot parse the CA key (expected a PEM private key)", e))?;
            let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, key).map_err(|e| {
                tls_err(
                    "cannot parse the CA certificate (expected a PEM certificate)",
                    e,
                )
            })?;
            // Sent after the leaf, in case the CA is an intermediate.
            (issuer, ca.cert_pem.clone(), ca.cert_pem.clone())
        }
        None => {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                .map_err(|e| tls_err("cannot generate the CA key", e))?;
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::OrganizationName, "xds-testserver");
            params
                .distinguished_name
                .push(DnType::CommonName, "xds-testserver mesh root");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params
                .self_signed(&key)
                .map_err(|e| tls_err("cannot self-sign the CA certificate", e))?;
            (Issuer::new(params, key), cert.pem(), String::new())
        }
    };

    let mut sans = vec!["localhost".to_owned(), "istiod.istio-system.svc".to_owned()];
    if listen.is_unspecified() {
        sans.push(Ipv4Addr::LOCALHOST.to_string());
        sans.push(Ipv6Addr::LOCALHOST.to_string());
    } else {
        sans.push(listen.to_string());
    }
    for san in &config.sans {
        if !sans.contains(san) {
            sans.push(san.clone());
        }
    }
    let mut params = CertificateParams::new(sans.clone()).map_err(|e| {
        Error::Tls(format!(
            "invalid subject alternative name among {sans:?} (expected DNS names or IPs): {e}"
        ))
    })?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "istiod.istio-system.svc");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| tls_err("cannot generate the serving key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| tls_err("cannot sign the serving certificate", e))?;

    if let Some(path) = &config.root_cert_out {
        std::fs::write(path, &root_pem).map_err(|source| Error::WriteRootCert {
            path: path.clone(),
            source,
        })?;
    }
    let chain = format!("{}{}", cert.pem(), chain_extra);
    let identity = Identity::from_pem(chain, key.serialize_pem());
    Ok(ServingTls {
        server: ServerTlsConfig::new().identity(identity),
        root_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CaPem;

    #[test]
    fn generates_a_root_and_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("root.pem");
        let config = TlsConfig {
            ca: None,
            sans: vec!["xds.example".into(), "10.0.0.1".into()],
            root_cert_out: Some(out.clone()),
        };
        let tls = build(&config, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        assert!(tls.root_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(std::fs::read_to_string(out).unwrap(), tls.root_pem);
    }

    #[test]
    fn loads_a_ca_from_pem() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let config = TlsConfig {
            ca: Some(CaPem {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            }),
            ..TlsConfig::default()
        };
        let tls = build(&config, IpAddr::V4(Ipv4Addr::UNSPECIFIED)).unwrap();
        assert_eq!(tls.root_pem, cert.pem());
    }

    /// A CA made with `openssl req -x509` and an `openssl ecparam -genkey` (SEC1) key: test-only.
    const OPENSSL_CA_CERT: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBqzCCAVGgAwIBAgIUO/QChV4Rsrf8u5OzvbQZkY22UWUwCgYIKoZIzj0EAwIw\n\
IzENMAsGA1UECgwEdGVzdDESMBAGA1UEAwwJdGVzdCByb290MB4XDTI2MTEyNzA4\n\
MDIyNloXDTI2MTIyNzA4MDIyNlowIzENMAsGA1UECgwEdGVzdDESMBAGA1UEAwwJ\n\
dGVzdCByb290MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE9dx4x+PeWhMOq3fA\n\
JfHTvNuFhZKiI0xqZM9fTy51y22R9t/KL5ipJ00WTWIuYlt7iAuzEvTsK2Jv7PWY\n\
QTyXw6NjMGEwHQYDVR0OBBYEFKUqDm8N8iBs7uNZJi7zh/P/9KqlMB8GA1UdIwQY\n\
MBaAFKUqDm8N8iBs7uNZJi7zh/P/9KqlMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0P\n\
AQH/BAQDAgEGMAoGCCqGSM49BAMCA0gAMEUCIDiHz4jBWjhleN0GARbjPx5KiuYg\n\
w2suvvvXHT4VImlQAiEAmaDTHb/m7DS6XZVw5UgBKfGFTHm9F/pQpXwdEfUPrSg=\n\
-----END CERTIFICATE-----";
    const OPENSSL_CA_SEC1_KEY: &str = "-----BEGIN EC PRIVATE KEY-----\n\
MHcCAQEEIBWpM8jNn7N/BUf3yjTA2US2/dgW6zFNJlYQ8olCLpgUoAoGCCqGSM49\n\
AwEHoUQDQgAE9dx4x+PeWhMOq3fAJfHTvNuFhZKiI0xqZM9fTy51y22R9t/KL5ip\n\
J00WTWIuYlt7iAuzEvTsK2Jv7PWYQTyXww==\n\
-----END EC PRIVATE KEY-----";

    #[test]
    fn loads_an_openssl_ca_with_a_sec1_key() {
        let config = TlsConfig {
            ca: Some(CaPem {
                cert_pem: OPENSSL_CA_CERT.into(),
                key_pem: OPENSSL_CA_SEC1_KEY.into(),
            }),
            ..TlsConfig::default()
        };
        let tls = build(&config, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        assert_eq!(tls.root_pem, OPENSSL_CA_CERT);
    }

    #[test]
    fn bad_material_is_named() {
        let config = TlsConfig {
            ca: Some(CaPem {
                cert_pem: "nope".into(),
                key_pem: "nope".into(),
            }),
            ..TlsConfig::default()
        };
        let err = build(&config, IpAddr::V4(Ipv4Addr::LOCALHOST))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("CA key"), "{err}");
    }
}
