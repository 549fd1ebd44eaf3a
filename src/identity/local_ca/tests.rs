use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use x509_parser::prelude::*;

use super::*;

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa)
}

fn near(a: SystemTime, b: SystemTime, slack: Duration) -> bool {
    let d = a.duration_since(b).unwrap_or_else(|e| e.duration());
    d <= slack
}

/// An intermediate CA signed by `root`: (cert PEM, key PEM).
fn intermediate(root: &LocalCa) -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "l4mesh intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &root.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn local_ca_is_shareable() {
    fn check<T: Send + Sync>() {}
    check::<LocalCa>();
}

#[test]
fn issue_makes_an_istio_shaped_leaf() {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let me = id("default", "client");
    let ttl = Duration::from_secs(3600);
    let cert = ca.issue(&me, ttl).unwrap();
    assert_eq!(cert.identity, me);
    assert_eq!(
        cert.chain.len(),
        1,
        "the root is not part of the sent chain"
    );
    assert_eq!(cert.roots, ca.roots());
    verify_chain(&cert.chain, &cert.roots, UnixTime::now()).unwrap();

    let (_, x) = X509Certificate::from_der(&cert.chain[0]).unwrap();
    assert_eq!(x.subject().iter().count(), 0, "empty subject");
    let san = x.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN must be critical with an empty subject");
    let names = &san.value.general_names;
    assert_eq!(names.len(), 1);
    assert!(matches!(names[0], GeneralName::URI(u) if u == me.to_string()));
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = x.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    assert!(!x.basic_constraints().unwrap().unwrap().value.ca);

    let now = SystemTime::now();
    let minute = Duration::from_secs(60);
    assert!(near(cert.not_before, now - minute, Duration::from_secs(5)));
    assert!(near(cert.not_after, now + ttl, Duration::from_secs(5)));
    // Two certificates for the same identity differ in key and serial.
    let again = ca.issue(&me, ttl).unwrap();
    let (_, y) = X509Certificate::from_der(&again.chain[0]).unwrap();
    assert_ne!(x.serial, y.serial);
    assert_ne!(cert.key.secret_pkcs8_der(), again.key.secret_pkcs8_der());
}

#[test]
fn generated_root_is_a_ca() {
    let ca = LocalCa::generate("cluster.local").unwrap();
    assert_eq!(ca.trust_domain(), "cluster.local");
    assert_eq!(pem_certs(&ca.root_pem()).unwrap(), ca.roots());
    let roots = ca.roots();
    let (_, x) = X509Certificate::from_der(&roots[0]).unwrap();
    assert!(x.basic_constraints().unwrap().unwrap().value.ca);
    assert!(x.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert!(x.subject().to_string().contains("l4mesh local CA"));
    let years = x.validity().time_to_expiration().unwrap().whole_days() / 365;
    assert_eq!(years, 9, "about 10 years left");
    assert!(LocalCa::generate("bad domain").is_err());
}

#[test]
fn sign_csr_round_trip() {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let me = id("ns1", "sa1");
    let (csr, key) = csr_for(&me).unwrap();
    assert!(csr.contains("BEGIN CERTIFICATE REQUEST"));
    let ttl = Duration::from_secs(86400);
    let chain = ca.sign_csr(&csr, &me, ttl).unwrap();
    assert_eq!(chain.len(), 2, "leaf, root");
    assert_eq!(pem_certs(&chain[1]).unwrap(), ca.roots(), "root last");

    let cert = workload_cert_from_chain(&me, &chain, key, ca.roots()).unwrap();
    assert_eq!(cert.identity, me);
    assert_eq!(cert.chain.len(), 1, "root stripped from the sent chain");
    let now = SystemTime::now();
    let minute = Duration::from_secs(60);
    assert!(near(cert.not_before, now - minute, minute));
    assert!(near(cert.not_after, now + ttl, minute));
}

#[test]
fn sign_csr_refuses_another_identity_and_garbage() {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let (csr, _) = csr_for(&id("ns1", "sa1")).unwrap();
    let err = ca
        .sign_csr(&csr, &id("ns2", "sa2"), Duration::from_secs(60))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spiffe://cluster.local/ns1/sa1") || err.contains("ns/ns1/sa/sa1"),
        "{err}"
    );
    assert!(
        err.contains("spiffe://cluster.local/ns/ns2/sa/sa2"),
        "{err}"
    );

    let err = ca
        .sign_csr("not a csr", &id("ns1", "sa1"), Duration::from_secs(60))
        .unwrap_err();
    assert!(matches!(err, CaError::Csr(_)), "{err}");
}

#[test]
fn from_pem_with_a_root() {
    let original = LocalCa::generate("cluster.local").unwrap();
    let key_pem = original.issuer.key().serialize_pem();
    let ca = LocalCa::from_pem(&original.root_pem(), &key_pem, "", "cluster.local").unwrap();
    assert_eq!(ca.roots(), original.roots());
    let me = id("a", "b");
    let (csr, key) = csr_for(&me).unwrap();
    let chain = ca.sign_csr(&csr, &me, Duration::from_secs(600)).unwrap();
    workload_cert_from_chain(&me, &chain, key, original.roots()).unwrap();
}

#[test]
fn from_pem_with_an_intermediate() {
    let root = LocalCa::generate("cluster.local").unwrap();
    let (inter_pem, inter_key) = intermediate(&root);
    let ca = LocalCa::from_pem(&inter_pem, &inter_key, &root.root_pem(), "cluster.local").unwrap();
    assert_eq!(ca.roots(), root.roots());

    let me = id("a", "b");
    let (csr, key) = csr_for(&me).unwrap();
    let chain = ca.sign_csr(&csr, &me, Duration::from_secs(600)).unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(
        pem_certs(&chain[1]).unwrap(),
        pem_certs(&inter_pem).unwrap()
    );
    let cert = workload_cert_from_chain(&me, &chain, key, root.roots()).unwrap();
    assert_eq!(cert.chain.len(), 2, "leaf and intermediate are sent");
    let issued = ca.issue(&me, Duration::from_secs(600)).unwrap();
    assert_eq!(issued.chain.len(), 2);
    verify_chain(&issued.chain, &root.roots(), UnixTime::now()).unwrap();

    // Istio's cert-chain.pem starts with the CA certificate itself: tolerated.
    let chain_pem = format!("{inter_pem}{}", root.root_pem());
    LocalCa::from_pem(&inter_pem, &inter_key, &chain_pem, "cluster.local").unwrap();

    // An intermediate without its chain cannot name its root.
    let err = LocalCa::from_pem(&inter_pem, &inter_key, "", "cluster.local")
        .unwrap_err()
        .to_string();
    assert!(err.contains("self-signed root"), "{err}");
}

#[test]
fn from_pem_errors_say_what_is_wrong() {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let key_pem = ca.issuer.key().serialize_pem();

    let err = LocalCa::from_pem("garbage", &key_pem, "", "cluster.local").unwrap_err();
    assert!(matches!(err, CaError::CaCert(_)), "{err}");
    assert!(
        err.to_string().contains("expected a PEM CERTIFICATE"),
        "{err}"
    );

    let err = LocalCa::from_pem(&ca.root_pem(), "garbage", "", "cluster.local").unwrap_err();
    assert!(matches!(err, CaError::CaKey(_)), "{err}");

    let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let err = LocalCa::from_pem(
        &ca.root_pem(),
        &other_key.serialize_pem(),
        "",
        "cluster.local",
    )
    .unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");

    // A workload certificate is not a CA.
    let leaf = ca.issue(&id("a", "b"), Duration::from_secs(60)).unwrap();
    let leaf_key = KeyPair::try_from(&leaf.key).unwrap().serialize_pem();
    let err = LocalCa::from_pem(
        &der_to_pem("CERTIFICATE", &leaf.chain[0]),
        &leaf_key,
        "",
        "cluster.local",
    )
    .unwrap_err();
    assert!(matches!(err, CaError::NotCa { .. }), "{err}");
    assert!(err.to_string().contains("CA:TRUE"), "{err}");
}

#[test]
fn workload_cert_from_chain_refusals() {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let other = LocalCa::generate("cluster.local").unwrap();
    let me = id("a", "b");
    let (csr, key) = csr_for(&me).unwrap();
    let chain = ca.sign_csr(&csr, &me, Duration::from_secs(600)).unwrap();

    let err = workload_cert_from_chain(&id("x", "y"), &chain, key.clone_key(), ca.roots())
        .unwrap_err()
        .to_string();
    assert!(err.contains("spiffe://cluster.local/ns/x/sa/y"), "{err}");
    assert!(err.contains("spiffe://cluster.local/ns/a/sa/b"), "{err}");

    let err = workload_cert_from_chain(&me, &chain, key.clone_key(), other.roots()).unwrap_err();
    assert!(matches!(err, CertError::Untrusted(_)), "{err}");
    assert!(
        err.to_string().contains("not issued by any of the"),
        "{err}"
    );

    let (_, wrong_key) = csr_for(&me).unwrap();
    let err = workload_cert_from_chain(&me, &chain, wrong_key, ca.roots()).unwrap_err();
    assert!(matches!(err, CertError::KeyMismatch(_)), "{err}");

    let err = workload_cert_from_chain(&me, &[], key, ca.roots()).unwrap_err();
    assert_eq!(err, CertError::EmptyChain);
}

#[test]
fn expired_certificates_do_not_verify() {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cert = ca
        .issue_with_validity(&id("a", "b"), now - 2 * hour, now - hour)
        .unwrap();
    let err = verify_chain(&cert.chain, &cert.roots, UnixTime::now()).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}
