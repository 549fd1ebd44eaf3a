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
    CaClient::istio(super::harness::istio_ca_at(addr))
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
        None,
    )
    .unwrap();
    let client_cfg = tls::client_config(
        ManagedCert::new(secrets.clone(), id("client")),
        roots,
        vec![id("server")],
        None,
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
        timeout: l4mesh::identity::DEFAULT_CA_TIMEOUT,
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

/// A TCP gate in front of `upstream`: while open it forwards connections; closed, it accepts
/// them and holds them unanswered (a CA that takes the call and never replies). Connections
/// forwarded before it closed are cut, as when the CA's process hangs.
struct Gate {
    addr: SocketAddr,
    open: Arc<std::sync::atomic::AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Gate {
    async fn start(upstream: SocketAddr) -> Gate {
        let l = TcpListener::bind("127.41.0.2:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let generation = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (o, g) = (open.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                let mut closed = g.subscribe();
                if !o.load(std::sync::atomic::Ordering::SeqCst) {
                    // Held, never answered, until the test ends.
                    tokio::spawn(async move {
                        let _held = down;
                        std::future::pending::<()>().await
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = closed.changed() => {}
                    }
                });
            }
        });
        Gate {
            addr,
            open,
            generation,
        }
    }

    fn set(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
        if !open {
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

/// Issue 14, item 5: a CA that accepts the call and never answers does not stall renewal (each
/// call has a deadline, retried with backoff); while the certificate is valid it keeps being
/// presented, and once it expires it never is: the handshake fails, a metric counts it, and the
/// state says `expired`. When the CA answers again, a new certificate is issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_ca_never_leaves_an_expired_certificate_in_use() {
    let ts = ca_server("127.0.0.1:0".parse().unwrap(), Duration::from_secs(3600)).await;
    let gate = Gate::start(ts.addr()).await;
    let mut settings = super::harness::istio_ca_at(gate.addr);
    settings.ttl = Duration::from_secs(6);
    settings.timeout = Duration::from_secs(1);
    let secrets = SecretManager::new(CaClient::istio(settings));
    let server = id("server");
    let first = secrets.fetch(&server).await.unwrap();
    gate.set(false);

    // Renewal is due at half-life (~1.5 s) and hangs; until expiry the old one is presented.
    let t_expiry = first.not_after;
    while std::time::SystemTime::now() + Duration::from_millis(500) < t_expiry {
        let c = secrets
            .current(&server)
            .expect("a valid certificate must be presented while the CA hangs");
        assert!(Arc::ptr_eq(&c, &first));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(secrets.unavailable_total(), 0);
    let st = secrets.status();
    assert_eq!(st[0].state, "unavailable", "{st:?}");
    let err = st[0].error.clone().unwrap_or_default();
    assert!(
        err.contains("did not answer") && err.contains("within 1s"),
        "{err}"
    );

    // Expired: never presented, a TLS server on it refuses handshakes, and it is counted.
    tokio::time::sleep(
        t_expiry
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            + Duration::from_millis(100),
    )
    .await;
    assert!(secrets.current(&server).is_none());
    let roots = first.roots.clone();
    let srv = tls::server_config(
        Arc::new(SourceResolver::new(ManagedCert::new(
            secrets.clone(),
            server.clone(),
        ))),
        roots.clone(),
        "cluster.local",
        None,
    )
    .unwrap();
    let addr = tls_echo(srv).await;
    let client_secrets = SecretManager::new(istio_ca(ts.addr()));
    client_secrets.fetch(&id("client")).await.unwrap();
    let cfg = tls::client_config(
        ManagedCert::new(client_secrets.clone(), id("client")),
        roots,
        vec![server.clone()],
        None,
    )
    .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let hs = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await;
    assert!(
        hs.is_err(),
        "a handshake succeeded on an expired certificate"
    );
    assert!(secrets.unavailable_total() >= 1);
    assert_eq!(secrets.status()[0].state, "unavailable");

    // The CA answers again: a fresh certificate within the backoff.
    gate.set(true);
    let renewed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Some(c) = secrets.current(&server) {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a new certificate once the CA answers");
    assert!(renewed.not_after > first.not_after);
}
