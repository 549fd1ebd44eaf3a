//! Workload certificates from the xds-testserver's Istio CA: issue, rotation at half-life seen by
//! new TLS handshakes while an established connection stays up, CA down at start, refusals, and
//! the node's identities following the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use l4mesh::config::{CaSource, Config, Source, XdsSettings};
use l4mesh::identity::{CaClient, IstioCaSettings, SecretManager};
use l4mesh::model::SpiffeId;
use l4mesh::tls::{self, ManagedCert, SourceResolver};
use xds_testserver::{Handle, Kind, StateSource};

const STATE: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["127.41.1.1"]
  protocol: HBONE
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.41.1.2"]
  protocol: HBONE
"#;

fn id(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .unwrap()
}

async fn ca_server(listen: SocketAddr, max_ttl: Duration) -> Handle {
    let mut c = xds_testserver::Config::new(StateSource::Yaml(STATE.into()));
    c.listen = listen;
    c.max_cert_ttl = max_ttl;
    Handle::start(c).await.unwrap()
}

fn istio_ca(addr: SocketAddr) -> CaClient {
    CaClient::Istio(super::harness::istio_ca_at(addr))
}

/// A TLS echo server presenting `source`'s certificate; returns its address.
async fn tls_echo(config: Arc<rustls::ServerConfig>) -> SocketAddr {
    let l = TcpListener::bind("127.41.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
    tls.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_second_certificates_rotate_under_live_tls() {
    let ts = ca_server("127.0.0.1:0".parse().unwrap(), Duration::from_secs(3)).await;
    let secrets = SecretManager::new(istio_ca(ts.addr()));
    let server_cert = secrets.fetch(&id("server")).await.unwrap();
    let client_cert = secrets.fetch(&id("client")).await.unwrap();
    let life = server_cert
        .not_after
        .duration_since(server_cert.not_before)
        .unwrap();
    assert!(
        life <= Duration::from_secs(3 + 60),
        "capped by --max-cert-ttl: {life:?}"
    );
    let roots = server_cert.roots.clone();

    let server_cfg = tls::server_config(
        Arc::new(SourceResolver::new(ManagedCert::new(
            secrets.clone(),
            id("server"),
        ))),
        roots.clone(),
        "cluster.local",
    )
    .unwrap();
    let client_cfg = tls::client_config(
        ManagedCert::new(secrets.clone(), id("client")),
        roots,
        vec![id("server")],
    )
    .unwrap();
    let addr = tls_echo(server_cfg).await;
    let connector = tokio_rustls::TlsConnector::from(client_cfg);
    let dial = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        connector.connect(name, tcp).await.unwrap()
    };
    let mut first = dial().await;
    echo(&mut first, b"before").await;
    let leaf = |c: &tokio_rustls::client::TlsStream<TcpStream>| {
        c.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let first_leaf = leaf(&first);
    assert_eq!(first_leaf, server_cert.chain[0]);

    // Renewal is due at half of the remaining life (~1.5 s); by 2.5 s a new handshake presents a
    // new certificate, on both sides, with no config rebuilt.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut second = dial().await;
    echo(&mut second, b"after").await;
    assert_ne!(
        leaf(&second),
        first_leaf,
        "the server presents the renewed certificate"
    );
    let renewed_client = secrets.current(&id("client")).unwrap();
    assert!(
        !Arc::ptr_eq(&renewed_client, &client_cert),
        "the client certificate was renewed too"
    );
    // The connection made with the first certificates stays up, past their expiry.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    echo(&mut first, b"still up").await;
    let status = secrets.status();
    assert!(status.iter().all(|s| s.state == "available"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_down_at_start_then_recovers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let secrets = SecretManager::new(istio_ca(addr));
    let mut rx = secrets.prefetch(&id("server"));
    let err = secrets.fetch(&id("server")).await.unwrap_err();
    assert!(
        err.to_string().contains("connecting to the control plane"),
        "{err}"
    );
    let st = secrets.status();
    assert_eq!(st[0].state, "unavailable");
    assert!(
        st[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains(&port.to_string()),
        "{st:?}"
    );

    let _ts = ca_server(addr, Duration::from_secs(3600)).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if matches!(
                *rx.borrow_and_update(),
                l4mesh::identity::CertState::Available(_)
            ) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("recovered once the CA came back");
    assert!(secrets.fetch(&id("server")).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_refuses_an_identity_not_in_the_mesh() {
    let ts = ca_server("127.0.0.1:0".parse().unwrap(), Duration::from_secs(3600)).await;
    let secrets = SecretManager::new(istio_ca(ts.addr()));
    let err = secrets.fetch(&id("intruder")).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("refused to sign") && text.contains("sa/intruder"),
        "{text}"
    );
    assert_eq!(ts.ca_stats().refused, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_identities_follow_the_store() {
    let ts = ca_server("127.0.0.1:0".parse().unwrap(), Duration::from_secs(3600)).await;
    let url = format!("http://{}", ts.addr());
    let mut config = Config::local("127.42.0.1".parse().unwrap());
    config.source = Source::Xds(XdsSettings::plaintext(&url));
    config.ca = CaSource::Istio(IstioCaSettings {
        address: url,
        root_ca: None,
        auth_token: None,
        cluster_id: "Kubernetes".into(),
        ttl: Duration::from_secs(3600),
        own_identity: None,
        packet_mark: 0,
    });
    l4mesh::telemetry::init(l4mesh::telemetry::LogFormat::Plain);
    let r = l4mesh::app::start(&config).await.unwrap();
    let wait_for = |want: Vec<&'static str>| {
        let secrets = r.secrets.clone();
        async move {
            for _ in 0..200 {
                let st = secrets.status();
                let got: Vec<String> = st
                    .iter()
                    .filter(|s| s.state == "available")
                    .map(|s| s.identity.clone())
                    .collect();
                let want: Vec<String> = want.iter().map(|sa| id(sa).to_string()).collect();
                if got == want && st.len() == want.len() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("identities never became {want:?}: {:?}", secrets.status());
        }
    };
    // Both workloads are on this node (node ""): both identities get certificates.
    wait_for(vec!["client", "server"]).await;
    // The client workload leaves: its certificate is dropped.
    assert!(ts.remove(Kind::Address, "cluster1//v1/Pod/default/client"));
    wait_for(vec!["server"]).await;
}
