//! Trust (issue 16, item 6), on in-process l4mesh nodes and xds-testservers over loopback:
//! - the mesh roots come from the CA's answer: while a root rotates, nodes whose certificates come
//!   from the old and from the new root trust each other, because the answer carries both;
//! - the CA's gRPC channel is opened once for every request, and reopened with the new root when
//!   the CA root file (`CA_ROOT_CA`) changes;
//! - revocation lists (`CRL_PATH`) refuse a revoked peer at the handshake, on both ends, and close
//!   its live connections when a new list arrives, counted as ztunnel counts them.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use l4mesh::identity::{CaClient, WorkloadCert};
use l4mesh::model::SpiffeId;
use xds_testserver::CaPem;

use super::harness::{
    closed_within, istio_ca_at, mesh_node_with, plug_in_root, socks5_connect_from, testserver,
    two_workloads_yaml,
};

const PORT: u16 = 18470;

fn id(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .unwrap()
}

/// An echo server that keeps each connection open until the client closes it.
async fn echo(addr: &str) -> tokio::task::JoinHandle<()> {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// A connection from workload `a` (at `a_ip`, through node `via`'s SOCKS5) to `dst`:`PORT`,
/// checked with one echoed message; `None` if the tunnel was refused.
async fn open(via: &l4mesh::app::Running, a_ip: &str, dst: &str) -> Option<TcpStream> {
    let src: IpAddr = a_ip.parse().unwrap();
    let mut s = socks5_connect_from(src, via.socks5.unwrap(), dst, PORT)
        .await
        .ok()?;
    s.write_all(b"ping").await.ok()?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .ok()?
        .ok()?;
    (&buf == b"ping").then_some(s)
}

/// The serial of `cert`'s leaf, as a revocation list names it.
fn serial(cert: &WorkloadCert) -> Vec<u8> {
    let (_, x) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
    x.raw_serial().to_vec()
}

/// The value of the sample `name` in `node`'s exposition (0 when absent).
fn sample(node: &l4mesh::app::Running, name: &str) -> u64 {
    let text = node.metrics.encode(false).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Node a on `<net>.1` with its certificates from a CA signing with `ca_a`, node b on `<net>.2`
/// from one signing with `ca_b` (each xds-testserver serving both workloads), an echo server at
/// each workload.
struct Pair {
    a: l4mesh::app::Running,
    b: l4mesh::app::Running,
    _servers: [xds_testserver::Handle; 2],
    _echoes: [tokio::task::JoinHandle<()>; 2],
}

async fn pair(net: &str, ca_a: CaPem, ca_b: CaPem) -> Pair {
    let (a_ip, b_ip) = (format!("{net}.1"), format!("{net}.2"));
    let state = two_workloads_yaml(&a_ip, &b_ip, "", "");
    let ts_a = testserver(state.clone(), "127.0.0.1", Some(ca_a)).await;
    let ts_b = testserver(state, "127.0.0.1", Some(ca_b)).await;
    let a = mesh_node_with(&ts_a, format!("{net}.11"), "node-a", &a_ip, |_| {}).await;
    let b = mesh_node_with(&ts_b, format!("{net}.12"), "node-b", &b_ip, |_| {}).await;
    let echoes = [
        echo(&format!("{a_ip}:{PORT}")).await,
        echo(&format!("{b_ip}:{PORT}")).await,
    ];
    Pair {
        a,
        b,
        _servers: [ts_a, ts_b],
        _echoes: echoes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_roots_of_a_rotation_are_trusted_from_the_ca_answer() {
    let (old, _) = plug_in_root("old mesh root");
    let (new, _) = plug_in_root("new mesh root");
    let both = format!("{}{}", old.cert_pem, new.cert_pem);
    let issuing = |ca: &CaPem, roots: &str| CaPem {
        roots_pem: roots.to_owned(),
        ..ca.clone()
    };
    // Node a renewed before the rotation (old root), node b after it (new root); each CA's answer
    // ends with both roots.
    let net = "127.61.1";
    let p = pair(net, issuing(&old, &both), issuing(&new, &both)).await;
    let (a_ip, b_ip) = (format!("{net}.1"), format!("{net}.2"));
    assert!(
        open(&p.a, &a_ip, &b_ip).await.is_some(),
        "old-root client to new-root server"
    );
    assert!(
        open(&p.b, &b_ip, &a_ip).await.is_some(),
        "new-root client to old-root server"
    );
    let roots = p.b.secrets.fetch(&id("server")).await.unwrap().roots.len();
    assert_eq!(roots, 2, "the answer's last element holds both roots");

    // Control: a CA answering with the new root alone leaves its node distrusting the old one.
    let net = "127.61.2";
    let p = pair(net, issuing(&old, &both), new.clone()).await;
    assert!(
        open(&p.a, &format!("{net}.1"), &format!("{net}.2"))
            .await
            .is_none(),
        "a server that trusts only the new root refuses an old-root client"
    );
}

/// A TCP gate counting the connections it forwards, to an upstream the test can switch; a switch
/// cuts the connections forwarded so far.
struct Gate {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    upstream: Arc<Mutex<SocketAddr>>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Gate {
    async fn start(upstream: SocketAddr) -> Gate {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let upstream = Arc::new(Mutex::new(upstream));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (n, up, cuts) = (accepted.clone(), upstream.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                let to = *up.lock().unwrap();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Gate {
            addr,
            accepted,
            upstream,
            cut,
        }
    }

    fn switch(&self, to: SocketAddr) {
        *self.upstream.lock().unwrap() = to;
        self.cut.send_modify(|g| *g += 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_channel_is_shared_and_follows_a_rotated_root_file() {
    let state = two_workloads_yaml("127.61.3.11", "127.61.3.12", "", "");
    let tls_server = |state: String| async move {
        let mut c = xds_testserver::Config::new(xds_testserver::StateSource::Yaml(state));
        c.tls = Some(xds_testserver::TlsConfig::default());
        xds_testserver::Handle::start(c).await.unwrap()
    };
    let first = tls_server(state.clone()).await;
    let second = tls_server(state).await;
    let gate = Gate::start(first.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root-cert.pem");
    std::fs::write(&root_file, first.root_cert_pem().unwrap()).unwrap();
    let mut settings = istio_ca_at(gate.addr);
    // The serving certificate names localhost, not the gate's address.
    settings.address = format!("https://localhost:{}", gate.addr.port());
    settings.root_ca = Some(l4mesh::control_plane::RootCa::File(root_file.clone()));
    let ca = CaClient::istio(settings);

    for sa in ["client", "server", "client"] {
        ca.fetch(&id(sa)).await.unwrap();
    }
    assert_eq!(
        gate.accepted.load(Ordering::SeqCst),
        1,
        "three requests, one connection"
    );
    assert_eq!(first.ca_stats().issued, 3);

    // The CA moves to a certificate from another root: with the old root file, nothing works.
    gate.switch(second.addr());
    let err = ca.fetch(&id("client")).await.unwrap_err().to_string();
    assert!(err.contains("localhost"), "{err}");
    // The root file follows; the next request reconnects with it.
    std::fs::write(&root_file, second.root_cert_pem().unwrap()).unwrap();
    let cert = ca.fetch(&id("client")).await.unwrap();
    assert_eq!(second.ca_stats().issued, 1);
    assert_eq!(
        cert.roots,
        l4mesh::identity::pem_certs(&second.root_cert_pem().unwrap()).unwrap()
    );
    let before = gate.accepted.load(Ordering::SeqCst);
    ca.fetch(&id("server")).await.unwrap();
    assert_eq!(gate.accepted.load(Ordering::SeqCst), before, "reused again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_peers_are_refused_and_their_live_connections_closed() {
    let (pem, ca) = plug_in_root("mesh root");
    let net = "127.61.4";
    let (a_ip, b_ip) = (format!("{net}.1"), format!("{net}.2"));
    let state = two_workloads_yaml(&a_ip, &b_ip, "", "");
    let ts = testserver(state, "127.0.0.1", Some(pem)).await;
    let dir = tempfile::tempdir().unwrap();
    let (crl_a, crl_b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
    std::fs::write(&crl_a, "").unwrap();
    std::fs::write(&crl_b, "").unwrap();
    let (pa, pb) = (crl_a.clone(), crl_b.clone());
    let a = mesh_node_with(&ts, format!("{net}.11"), "node-a", &a_ip, |c| {
        c.crl_path = Some(pa)
    })
    .await;
    let b = mesh_node_with(&ts, format!("{net}.12"), "node-b", &b_ip, |c| {
        c.crl_path = Some(pb)
    })
    .await;
    let _echo = echo(&format!("{b_ip}:{PORT}")).await;
    let limit = Duration::from_secs(10);

    // Node a's list revokes b's certificate: a closes its connection to b and opens no other.
    let mut live = open(&a, &a_ip, &b_ip)
        .await
        .expect("a tunnel before any list");
    let b_cert = b.secrets.fetch(&id("server")).await.unwrap();
    std::fs::write(&crl_a, ca.revocation_list(&[serial(&b_cert)]).unwrap()).unwrap();
    assert!(
        closed_within(&mut live, limit).await.is_some(),
        "the live connection to a revoked server is closed"
    );
    let (source, destination) = (
        "istio_crl_policy_rejections_total{reporter=\"source\"}",
        "istio_crl_policy_rejections_total{reporter=\"destination\"}",
    );
    assert_eq!(sample(&a, source), 1, "the live connection closed");
    assert!(
        open(&a, &a_ip, &b_ip).await.is_none(),
        "a new one is refused"
    );
    assert_eq!(sample(&a, source), 2, "and its handshake counted");
    assert_eq!(sample(&b, destination), 0);

    // The list is withdrawn; then node b's list revokes a's certificate: b closes the connection
    // a opened to it (a GOAWAY, then it drops it) and refuses the next one.
    std::fs::write(&crl_a, "").unwrap();
    let mut live = None;
    for _ in 0..50 {
        live = open(&a, &a_ip, &b_ip).await;
        if live.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut live = live.expect("tunnels again once the list is withdrawn");
    let a_cert = a.secrets.fetch(&id("client")).await.unwrap();
    std::fs::write(&crl_b, ca.revocation_list(&[serial(&a_cert)]).unwrap()).unwrap();
    assert!(
        closed_within(&mut live, limit).await.is_some(),
        "the live connection from a revoked client is closed"
    );
    assert_eq!(sample(&b, destination), 1, "the live connection closed");
    // TLS 1.3: a's side of a handshake ends before b's refusal arrives; a then retries the
    // CONNECT once on a new connection, which b refuses too.
    assert!(
        open(&a, &a_ip, &b_ip).await.is_none(),
        "a new one is refused"
    );
    assert_eq!(
        sample(&b, destination),
        3,
        "and both its handshakes counted"
    );
    assert_eq!(
        sample(
            &a,
            "istio_crl_untracked_connections_total{reporter=\"source\"}"
        ),
        0
    );
}
