//! The CA policy without sockets: CSR parsing, validity, impersonation, served identities, setup.

use std::collections::BTreeMap;

use l4mesh::identity::csr_for;
use prost_types::{Struct, Value};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tonic::Code;

use super::*;
use crate::state::Resources;
use crate::StateSource;

const DAY: Duration = Duration::from_secs(86_400);

const YAML: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.0.1.1"]
- uid: cluster1//v1/Pod/other/nosa
  name: nosa
  namespace: other
  workloadIps: ["127.0.1.2"]
- uid: cluster1//v1/Pod/foreign/x
  name: x
  namespace: foreign
  serviceAccount: x
  trustDomain: example.org
  workloadIps: ["127.0.1.3"]
"#;

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn state() -> State {
    State::new(Resources::from_yaml(YAML).unwrap())
}

fn mesh(edit: impl FnOnce(&mut Config)) -> MeshCa {
    let mut config = Config::new(StateSource::Yaml(String::new()));
    edit(&mut config);
    MeshCa::setup(&config).unwrap().0
}

fn request(csr_id: &str, impersonated: Option<&str>, validity: i64) -> IstioCertificateRequest {
    let (csr, _) = csr_for(&id(csr_id)).unwrap();
    IstioCertificateRequest {
        csr,
        validity_duration: validity,
        metadata: impersonated.map(|imp| Struct {
            fields: BTreeMap::from([(
                IMPERSONATED_IDENTITY.to_owned(),
                Value {
                    kind: Some(ValueKind::StringValue(imp.to_owned())),
                },
            )]),
        }),
    }
}

/// A CSR with arbitrary SANs (DNS names, IPs, `spiffe://`… URIs are not parsed by rcgen: use
/// [`csr_for`] for those).
fn csr_with_sans(sans: &[&str]) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

#[test]
fn validity_is_the_request_capped_at_the_maximum() {
    assert_eq!(validity(3600, DAY), Duration::from_secs(3600));
    assert_eq!(validity(0, DAY), DAY);
    assert_eq!(validity(-5, DAY), DAY);
    assert_eq!(validity(i64::MAX, DAY), DAY);
    assert_eq!(validity(86_401, DAY), DAY);
}

#[test]
fn the_csr_identity_is_its_one_uri_san() {
    let client = id("spiffe://cluster.local/ns/default/sa/client");
    let (csr, _) = csr_for(&client).unwrap();
    assert_eq!(csr_identity(&csr).unwrap(), client);

    let err = csr_identity("").unwrap_err();
    assert!(err.contains("no CSR"), "{err}");
    let err = csr_identity(
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    )
    .unwrap_err();
    assert!(err.contains("not a PEM CERTIFICATE REQUEST"), "{err}");
    let err = csr_identity(&csr_with_sans(&["web.example", "10.0.0.1"])).unwrap_err();
    assert!(
        err.contains("DNS:web.example")
            && err.contains("IP:10.0.0.1")
            && err.contains("exactly one"),
        "{err}"
    );
    let err = csr_identity(&csr_with_sans(&[])).unwrap_err();
    assert!(err.contains("[]"), "{err}");
}

#[test]
fn impersonation_metadata_must_be_a_spiffe_id_string() {
    assert_eq!(impersonated(None).unwrap(), None);
    let empty = Struct::default();
    assert_eq!(impersonated(Some(&empty)).unwrap(), None);
    let with = |kind| Struct {
        fields: BTreeMap::from([(IMPERSONATED_IDENTITY.to_owned(), Value { kind: Some(kind) })]),
    };
    let s = "spiffe://cluster.local/ns/a/sa/b";
    assert_eq!(
        impersonated(Some(&with(ValueKind::StringValue(s.into())))).unwrap(),
        Some(id(s))
    );
    let err = impersonated(Some(&with(ValueKind::NumberValue(1.0)))).unwrap_err();
    assert!(err.contains("expected a string"), "{err}");
    let err = impersonated(Some(&with(ValueKind::StringValue("a/b".into())))).unwrap_err();
    assert!(
        err.contains("ImpersonatedIdentity") && err.contains("spiffe://"),
        "{err}"
    );
}

#[test]
fn served_identities_use_l4mesh_defaults() {
    let ids: Vec<String> = served_identities(&state())
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        ids,
        [
            "spiffe://cluster.local/ns/default/sa/client",
            "spiffe://cluster.local/ns/other/sa/default",
            "spiffe://example.org/ns/foreign/sa/x",
        ]
    );
}

#[test]
fn authorize_applies_the_policy_in_order() {
    let ca = mesh(|c| {
        c.max_cert_ttl = Duration::from_secs(600);
        c.allowed_identities = vec!["spiffe://cluster.local/ns/extra/sa/tool".into()];
    });
    let state = state();
    let client = "spiffe://cluster.local/ns/default/sa/client";

    let (got, ttl) = ca.authorize(&request(client, None, 60), &state).unwrap();
    assert_eq!(
        (got.to_string(), ttl),
        (client.to_owned(), Duration::from_secs(60))
    );
    let (_, ttl) = ca
        .authorize(&request(client, Some(client), 0), &state)
        .unwrap();
    assert_eq!(ttl, Duration::from_secs(600));
    let tool = "spiffe://cluster.local/ns/extra/sa/tool";
    assert!(ca.authorize(&request(tool, None, 60), &state).is_ok());

    let refused = |req: IstioCertificateRequest, code: Code, needles: &[&str]| {
        let status = ca.authorize(&req, &state).unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
        for n in needles {
            assert!(
                status.message().contains(n),
                "{n:?} in {}",
                status.message()
            );
        }
    };
    let ghost = "spiffe://cluster.local/ns/default/sa/ghost";
    refused(
        request(ghost, None, 60),
        Code::PermissionDenied,
        &[ghost, "no served workload", client],
    );
    refused(
        request(client, Some(ghost), 60),
        Code::PermissionDenied,
        &[client, ghost, IMPERSONATED_IDENTITY],
    );
    // Served, but outside the CA's trust domain.
    let foreign = "spiffe://example.org/ns/foreign/sa/x";
    refused(
        request(foreign, None, 60),
        Code::PermissionDenied,
        &[foreign, "trust domain"],
    );
    let mut bad = request(client, None, 60);
    bad.csr = csr_with_sans(&["web.example"]);
    refused(bad, Code::InvalidArgument, &["DNS:web.example"]);
}

#[test]
fn a_signed_chain_ends_with_the_root() {
    let ca = mesh(|_| {});
    let client = id("spiffe://cluster.local/ns/default/sa/client");
    let (csr, _) = csr_for(&client).unwrap();
    let chain = ca.sign(&csr, &client, Duration::from_secs(60)).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain.last(), Some(&ca.root_pem()));
    let other = id("spiffe://cluster.local/ns/default/sa/other");
    let status = ca.sign(&csr, &other, Duration::from_secs(60)).unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[test]
fn setup_checks_the_settings_and_writes_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("root.pem");
    let ca = mesh(|c| c.root_cert_out = Some(out.clone()));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), ca.root_pem());
    assert!(!ca.plugged_in());

    let fails = |edit: &dyn Fn(&mut Config), needle: &str| {
        let mut config = Config::new(StateSource::Yaml(String::new()));
        edit(&mut config);
        let err = MeshCa::setup(&config).err().unwrap().to_string();
        assert!(err.contains(needle), "{needle:?} in {err}");
    };
    fails(&|c| c.max_cert_ttl = Duration::ZERO, "at least one second");
    fails(
        &|c| c.allowed_identities = vec!["spiffe://example.org/ns/a/sa/b".into()],
        "not in the trust domain",
    );
    fails(
        &|c| c.allowed_identities = vec!["cluster.local/ns/a/sa/b".into()],
        "allowed identity",
    );
    fails(&|c| c.trust_domain = "bad domain".into(), "trust domain");
    fails(
        &|c| {
            c.ca = Some(CaPem {
                cert_pem: "nope".into(),
                key_pem: "nope".into(),
                chain_pem: String::new(),
                roots_pem: String::new(),
            })
        },
        "CA certificate",
    );
    fails(
        &|c| c.root_cert_out = Some(dir.path().join("missing/dir/root.pem")),
        "cannot write the root certificate",
    );
}
