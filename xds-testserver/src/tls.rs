//! The generated mesh root (when no CA is plugged in) and the gRPC serving certificate: an ECDSA
//! P-256 leaf signed by the mesh CA for `localhost`, `istiod.istio-system.svc`, the listen IP and any
//! extra names, sent with the CA's intermediates, so that a standard gRPC client that trusts the mesh
//! root verifies it.
//!
//! Not here: workload certificates (`ca`, through l4mesh's `LocalCa`, which mints SPIFFE leaves
//! only: hence this rcgen leaf, signed with the same CA key), client certificates (no mTLS),
//! rotation (the serving certificate lives as long as the process).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use tonic::transport::{Identity, ServerTlsConfig};

use crate::{CaPem, Error, TlsConfig};

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

/// A fresh self-signed ECDSA P-256 root (CA:TRUE, keyCertSign) named after the trust domain.
pub(crate) fn generate_root(trust_domain: &str) -> Result<CaPem, Error> {
    let err = |what: &str, e: rcgen::Error| Error::CaSetup(format!("{what}: {e}"));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| err("cannot generate the CA key", e))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
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
        .map_err(|e| err("cannot self-sign the CA certificate", e))?;
    Ok(CaPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        chain_pem: String::new(),
        roots_pem: String::new(),
    })
}

/// Issues the serving certificate with the CA `ca` (already checked by `LocalCa::from_pem`, whose
/// root is `root_der`), and returns the tonic TLS config that serves it.
pub(crate) fn serving(
    config: &TlsConfig,
    ca: &CaPem,
    root_der: &[u8],
    listen: IpAddr,
) -> Result<ServerTlsConfig, Error> {
    let tls_err = |what: &str, e: rcgen::Error| Error::Tls(format!("{what}: {e}"));
    let ca_key = KeyPair::from_pem(&ca.key_pem)
        .map_err(|e| tls_err("cannot parse the CA key (expected a PEM private key)", e))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
        .map_err(|e| tls_err("cannot use the CA certificate as an issuer", e))?;

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

    let mut chain = cert.pem();
    for block in intermediates(ca, root_der)? {
        chain.push('\n');
        chain.push_str(block);
        chain.push('\n');
    }
    let identity = Identity::from_pem(chain, key.serialize_pem());
    Ok(ServerTlsConfig::new().identity(identity))
}

/// The PEM blocks of the CA certificate and its chain, without the root and without repeats: what
/// a server sends after its leaf.
fn intermediates<'a>(ca: &'a CaPem, root_der: &[u8]) -> Result<Vec<&'a str>, Error> {
    let mut seen: Vec<Vec<u8>> = vec![root_der.to_vec()];
    let mut out = Vec::new();
    for block in cert_blocks(&ca.cert_pem)
        .into_iter()
        .chain(cert_blocks(&ca.chain_pem))
    {
        let certs = l4mesh::identity::pem_certs(block)
            .map_err(|e| Error::Tls(format!("the CA chain: {e}")))?;
        for der in certs {
            if !seen.iter().any(|s| s[..] == der[..]) {
                seen.push(der.to_vec());
                out.push(block);
            }
        }
    }
    Ok(out)
}

/// The `CERTIFICATE` blocks of a PEM text, in order.
fn cert_blocks(pem: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let from = &rest[start..];
        let Some(end) = from.find(END) else { break };
        out.push(&from[..end + END.len()]);
        rest = &from[end + END.len()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use l4mesh::identity::LocalCa;

    fn root_der(ca: &CaPem) -> Vec<u8> {
        let local =
            LocalCa::from_pem(&ca.cert_pem, &ca.key_pem, &ca.chain_pem, "cluster.local").unwrap();
        local.roots()[0].to_vec()
    }

    #[test]
    fn a_generated_root_is_a_usable_ca() {
        let ca = generate_root("example.org").unwrap();
        assert!(ca.cert_pem.starts_with(BEGIN));
        let root = root_der(&ca);
        assert!(intermediates(&ca, &root).unwrap().is_empty());
        serving(
            &TlsConfig {
                sans: vec!["xds.example".into(), "10.0.0.1".into()],
            },
            &ca,
            &root,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        )
        .unwrap();
    }

    #[test]
    fn an_intermediate_is_sent_and_the_root_is_not() {
        let root = generate_root("cluster.local").unwrap();
        let root_key = KeyPair::from_pem(&root.key_pem).unwrap();
        let root_issuer = Issuer::from_ca_cert_pem(&root.cert_pem, root_key).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.use_authority_key_identifier_extension = true;
        let inter = params.signed_by(&key, &root_issuer).unwrap();
        let ca = CaPem {
            cert_pem: inter.pem(),
            key_pem: key.serialize_pem(),
            // Starting with the intermediate itself, as istiod's cert-chain.pem may.
            roots_pem: String::new(),
            chain_pem: format!("{}\n{}", inter.pem(), root.cert_pem),
        };
        let root_der = root_der(&ca);
        let sent = intermediates(&ca, &root_der).unwrap();
        assert_eq!(sent, [inter.pem().trim()]);
        serving(
            &TlsConfig::default(),
            &ca,
            &root_der,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        )
        .unwrap();
    }

    #[test]
    fn a_bad_san_is_named() {
        let ca = generate_root("cluster.local").unwrap();
        let root = root_der(&ca);
        let config = TlsConfig {
            sans: vec!["caf\u{e9}.example".into()],
        };
        let err = serving(&config, &ca, &root, IpAddr::V4(Ipv4Addr::LOCALHOST))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("caf\u{e9}.example"), "{err}");
    }

    /// A CA made with `openssl ecparam -genkey` (a SEC1 key) and `openssl req -x509 -days 36500`:
    /// test-only material.
    const OPENSSL_CA_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBrjCCAVOgAwIBAgIUPedG8hwC/uq5jOHgvDJivSOsArswCgYIKoZIzj0EAwIw
IzENMAsGA1UECgwEdGVzdDESMBAGA1UEAwwJdGVzdCByb290MCAXDTI2MTEyNzA4
NDMwMloYDzIxMjYxMTAzMDg0MzAyWjAjMQ0wCwYDVQQKDAR0ZXN0MRIwEAYDVQQD
DAl0ZXN0IHJvb3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAS9M+3F+HIC/sls
2qi8wBAO+oDs9YqGMVRjymPHgag8xRq/dFgYA6FxEXJfMoiR620Xi39huML8EDCh
rkkag0Mso2MwYTAdBgNVHQ4EFgQU2cBNLM4JjUTjMNPISfwhiMl+rCUwHwYDVR0j
BBgwFoAU2cBNLM4JjUTjMNPISfwhiMl+rCUwDwYDVR0TAQH/BAUwAwEB/zAOBgNV
HQ8BAf8EBAMCAQYwCgYIKoZIzj0EAwIDSQAwRgIhALNqu+nThLpcFlP7jfzbndig
NnbOzey4RQ0u4t/oY6z0AiEA0bQ8NnNiogRI2e5ULLKyX/r7VIbMRZ+AWgE3Z3GA
O7Q=
-----END CERTIFICATE-----
";
    const OPENSSL_CA_SEC1_KEY: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIFOp1WvBBemhvPgowQgjbWxZOPuZa1aqdFlYjPjBiSPXoAoGCCqGSM49
AwEHoUQDQgAEvTPtxfhyAv7JbNqovMAQDvqA7PWKhjFUY8pjx4GoPMUav3RYGAOh
cRFyXzKIkettF4t/YbjC/BAwoa5JGoNDLA==
-----END EC PRIVATE KEY-----
";

    #[test]
    fn an_openssl_ca_with_a_sec1_key_signs_the_serving_certificate() {
        let ca = CaPem {
            cert_pem: OPENSSL_CA_CERT.into(),
            key_pem: OPENSSL_CA_SEC1_KEY.into(),
            chain_pem: String::new(),
            roots_pem: String::new(),
        };
        let root = root_der(&ca);
        assert!(intermediates(&ca, &root).unwrap().is_empty());
        serving(
            &TlsConfig::default(),
            &ca,
            &root,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        )
        .unwrap();
    }
}
