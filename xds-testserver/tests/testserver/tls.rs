//! TLS with the server's own mesh root, and the bearer token check.

use super::common::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::Code;
use xds_testserver::{Config, Handle, Kind, StateSource, TlsConfig};

const TOKEN: &str = "s3cr3t-token";

async fn tls_server(out: Option<std::path::PathBuf>) -> Handle {
    let mut config = Config::new(StateSource::Yaml(YAML.to_owned()));
    config.tls = Some(TlsConfig {
        sans: vec!["xds.example.test".into()],
    });
    config.root_cert_out = out;
    config.token = Some(TOKEN.to_owned());
    Handle::start(config).await.unwrap()
}

/// A TLS channel that trusts only `root`, verifying the server as `domain` (or by IP when `None`).
async fn channel(server: &Handle, root: &str, domain: Option<&str>) -> Channel {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root));
    if let Some(domain) = domain {
        tls = tls.domain_name(domain);
    }
    Channel::from_shared(format!("https://{}", server.addr()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn tls_with_token_serves_and_without_token_refuses() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("root.pem");
        let server = tls_server(Some(out.clone())).await;
        let root = server.root_cert_pem().unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), root);

        // Verified by DNS name (localhost) and by IP (the listen IP).
        for domain in [
            Some("localhost"),
            Some("istiod.istio-system.svc"),
            Some("xds.example.test"),
            None,
        ] {
            let ch = channel(&server, &root, domain).await;
            let mut c = Client::open(ch, Some(TOKEN)).await.unwrap();
            let r = c.wildcard(Kind::Address).await;
            assert_eq!(names(&r), [CLIENT, ECHO, SVC]);
            c.ack(&r).await;
        }

        // Without the token: UNAUTHENTICATED, saying what was expected.
        let ch = channel(&server, &root, None).await;
        let err = Client::open(ch.clone(), None).await.err().unwrap();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("Bearer"), "{}", err.message());
        let err = Client::open(ch, Some("wrong")).await.err().unwrap();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(!err.message().contains(TOKEN));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_root_is_refused() {
    bounded(async {
        let server = tls_server(None).await;
        let other = tls_server(None).await;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(other.root_cert_pem().unwrap()))
            .domain_name("localhost");
        let connected = Channel::from_shared(format!("https://{}", server.addr()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await;
        // The handshake fails at connect, or at the first call.
        if let Ok(ch) = connected {
            assert!(
                Client::open(ch, Some(TOKEN)).await.is_err(),
                "a foreign root must not verify"
            );
        }
        // Plaintext to a TLS port fails too.
        let plain = Channel::from_shared(format!("http://{}", server.addr()))
            .unwrap()
            .connect()
            .await;
        if let Ok(ch) = plain {
            assert!(Client::open(ch, Some(TOKEN)).await.is_err());
        }
        server.shutdown().await;
        other.shutdown().await;
    })
    .await;
}
