//! The Istio CA on the gRPC port: CSR round trips verified with l4mesh's own chain checks, the
//! validity cap, refusals (identity, impersonation, token), counters, and l4mesh's CA client over TLS.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use l4mesh::control_plane::RootCa;
use l4mesh::identity::{
    csr_for, pem_certs, workload_cert_from_chain, CaClient, IstioCaSettings, WorkloadCert,
};
use l4mesh::model::SpiffeId;
use l4mesh::proto::istio::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use l4mesh::proto::istio::ca::IstioCertificateRequest;
use prost_types::{value::Kind as ValueKind, Struct, Value};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use xds_testserver::{CaStats, Config, Handle, StateSource, TlsConfig};

use super::common::*;

const TOKEN: &str = "ca-token";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const ECHO_ID: &str = "spiffe://cluster.local/ns/default/sa/echo";
const GHOST_ID: &str = "spiffe://cluster.local/ns/default/sa/ghost";

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// A plaintext server with the test state, the token, and `edit` applied.
async fn server(edit: impl FnOnce(&mut Config)) -> Handle {
    let mut config = Config::new(StateSource::Yaml(YAML.to_owned()));
    config.token = Some(TOKEN.to_owned());
    edit(&mut config);
    Handle::start(config).await.unwrap()
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A request with `csr`, and `ImpersonatedIdentity: impersonated` when given.
fn request(csr: String, validity_secs: i64, impersonated: Option<&str>) -> IstioCertificateRequest {
    let metadata = impersonated.map(|imp| Struct {
        fields: BTreeMap::from([(
            "ImpersonatedIdentity".to_owned(),
            Value {
                kind: Some(ValueKind::StringValue(imp.to_owned())),
            },
        )]),
    });
    IstioCertificateRequest {
        csr,
        validity_duration: validity_secs,
        metadata,
    }
}

/// A request with a CSR for `csr_id` whose key is dropped: for refusals.
fn csr_request(
    csr_id: &str,
    validity_secs: i64,
    impersonated: Option<&str>,
) -> IstioCertificateRequest {
    let (csr, _key) = csr_for(&id(csr_id)).unwrap();
    request(csr, validity_secs, impersonated)
}

/// `CreateCertificate` with `authorization: Bearer <token>` when given: the PEM chain.
async fn create(
    ch: Channel,
    token: Option<&str>,
    req: IstioCertificateRequest,
) -> Result<Vec<String>, Status> {
    let mut request = Request::new(req);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let mut client = IstioCertificateServiceClient::new(ch);
    let response = tokio::time::timeout(WAIT, client.create_certificate(request))
        .await
        .expect("no answer from the CA")?;
    Ok(response.into_inner().cert_chain)
}

/// Asks for a certificate for `csr_id` and checks the answer with l4mesh's own checks (identity,
/// chain up to `root_pem`, key), and that the chain ends with the root: the chain and certificate.
pub async fn issue(
    ch: Channel,
    token: Option<&str>,
    (csr_id, validity_secs, impersonated): (&str, i64, Option<&str>),
    root_pem: &str,
) -> Result<(Vec<String>, WorkloadCert), Status> {
    let (csr, key) = csr_for(&id(csr_id)).unwrap();
    let chain = create(ch, token, request(csr, validity_secs, impersonated)).await?;
    assert_eq!(
        chain.last().map(String::as_str),
        Some(root_pem),
        "root last"
    );
    let roots = pem_certs(root_pem).unwrap();
    let cert = workload_cert_from_chain(&id(csr_id), &chain, key, roots).unwrap();
    assert_eq!(cert.identity, id(csr_id));
    Ok((chain, cert))
}

/// Asserts the certificate is valid from now (a minute of skew allowed) for `ttl`, within a minute.
pub fn assert_validity(cert: &WorkloadCert, ttl: Duration) {
    let now = SystemTime::now();
    assert!(cert.not_before <= now);
    let expected = now + ttl;
    let diff = match cert.not_after.duration_since(expected) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(
        diff <= Duration::from_secs(60),
        "not_after {:?}, expected about {expected:?}",
        cert.not_after
    );
}

#[tokio::test]
async fn a_csr_round_trip_yields_a_verified_chain_capped_at_the_maximum() {
    bounded(async {
        let server = server(|c| c.max_cert_ttl = Duration::from_secs(7200)).await;
        let root = server.root_cert_pem().unwrap();
        let ch = channel(server.addr()).await;
        for (requested, expected) in [(3600, 3600), (0, 7200), (-1, 7200), (1_000_000, 7200)] {
            let ask = (CLIENT_ID, requested, None);
            let (chain, cert) = issue(ch.clone(), Some(TOKEN), ask, &root).await.unwrap();
            assert_eq!(chain.len(), 2, "leaf and root");
            assert_validity(&cert, Duration::from_secs(expected));
        }
        // Impersonating the identity asked for is fine.
        let ask = (ECHO_ID, 600, Some(ECHO_ID));
        issue(ch, Some(TOKEN), ask, &root).await.unwrap();
        assert_eq!(
            server.ca_stats(),
            CaStats {
                issued: 5,
                refused: 0,
                last_refusal: None
            }
        );
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_identity_not_served_is_refused_until_served_or_allowed() {
    bounded(async {
        let tool = "spiffe://cluster.local/ns/tools/sa/debug";
        let server = server(|c| c.allowed_identities = vec![tool.to_owned()]).await;
        let ch = channel(server.addr()).await;

        let root = server.root_cert_pem().unwrap();
        let err = create(ch.clone(), Some(TOKEN), csr_request(GHOST_ID, 600, None))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        assert!(err.message().contains(GHOST_ID), "{}", err.message());
        assert!(err.message().contains(CLIENT_ID), "{}", err.message());
        let stats = server.ca_stats();
        assert_eq!((stats.issued, stats.refused), (0, 1));
        assert!(stats.last_refusal.unwrap().contains(GHOST_ID));

        // An --allow-identity needs no workload.
        issue(ch.clone(), Some(TOKEN), (tool, 600, None), &root)
            .await
            .unwrap();

        // Once a workload with that identity is served, it is signed.
        server
            .upsert_yaml(
                "workloads:\n- {uid: cluster1//v1/Pod/default/ghost, name: ghost, \
                 namespace: default, serviceAccount: ghost, workloadIps: [127.0.3.1]}\n",
            )
            .unwrap();
        issue(ch, Some(TOKEN), (GHOST_ID, 600, None), &root)
            .await
            .unwrap();

        // The admin API reports the same.
        let admin = server.admin_addr().unwrap();
        let (status, body) = http_text(admin, "GET", "/ca", "").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["issued"], 2);
        assert_eq!(v["refused"], 1);
        assert!(v["last_refusal"].as_str().unwrap().contains(GHOST_ID));
        assert_eq!(v["trust_domain"], "cluster.local");
        assert_eq!(v["max_cert_ttl_secs"], 86_400);
        assert_eq!(v["plugged_in"], false);
        assert_eq!(v["allowed_identities"][0], tool);
        assert_eq!(v["root_cert_pem"], root);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn impersonating_another_identity_is_refused() {
    bounded(async {
        let server = server(|_| {}).await;
        let ch = channel(server.addr()).await;
        let req = csr_request(CLIENT_ID, 600, Some(ECHO_ID));
        let err = create(ch, Some(TOKEN), req).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        assert!(
            err.message().contains(CLIENT_ID)
                && err.message().contains(ECHO_ID)
                && err.message().contains("ImpersonatedIdentity"),
            "{}",
            err.message()
        );
        assert_eq!(server.ca_stats().refused, 1);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_unauthenticated() {
    bounded(async {
        let server = server(|_| {}).await;
        let ch = channel(server.addr()).await;
        for token in [None, Some("wrong")] {
            let req = csr_request(CLIENT_ID, 600, None);
            let err = create(ch.clone(), token, req).await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
            assert!(!err.message().contains(TOKEN));
        }
        let stats = server.ca_stats();
        assert_eq!((stats.issued, stats.refused), (0, 2));
        assert!(stats.last_refusal.unwrap().starts_with("Unauthenticated"));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_bad_csr_is_an_invalid_argument() {
    bounded(async {
        let server = server(|_| {}).await;
        let ch = channel(server.addr()).await;
        let req = request("not a csr".into(), 600, None);
        let err = create(ch, Some(TOKEN), req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains("CERTIFICATE REQUEST"),
            "{}",
            err.message()
        );
        server.shutdown().await;
    })
    .await;
}

/// l4mesh's own CA client, over TLS, trusting only the server's root for both the serving
/// certificate and the workload certificate: the same CA signs both.
#[tokio::test]
async fn l4mesh_fetches_a_certificate_over_tls() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, TOKEN).unwrap();
        let server = server(|c| c.tls = Some(TlsConfig::default())).await;
        let root = server.root_cert_pem().unwrap();
        let client = CaClient::istio(IstioCaSettings {
            address: format!("https://localhost:{}", server.addr().port()),
            root_ca: Some(RootCa::Pem(root)),
            auth_token: Some(token_file),
            cluster_id: "Kubernetes".into(),
            ttl: Duration::from_secs(3600),
            // Another identity: the request carries ImpersonatedIdentity.
            own_identity: Some(id("spiffe://cluster.local/ns/istio-system/sa/ztunnel")),
            packet_mark: 0,
            timeout: l4mesh::identity::DEFAULT_CA_TIMEOUT,
        });
        let cert = client.fetch(&id(CLIENT_ID)).await.unwrap();
        assert_eq!(cert.identity, id(CLIENT_ID));
        assert_validity(&cert, Duration::from_secs(3600));
        assert_eq!(server.ca_stats().issued, 1);

        let err = client.fetch(&id(GHOST_ID)).await.unwrap_err().to_string();
        assert!(
            err.contains("PermissionDenied") || err.contains("permission"),
            "{err}"
        );
        server.shutdown().await;
    })
    .await;
}
