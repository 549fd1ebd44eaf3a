//! HBONE between two l4mesh instances in-process, each on its own node with its own workload,
//! both following one xds-testserver (xDS and CA): client → A's SOCKS5 → HBONE (mutual TLS,
//! HTTP/2 CONNECT) → B's inbound listener → backend on B's workload IP.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use xds_testserver::Handle;

use super::harness::closed_within;
use super::harness::{
    endpoint_of_yaml, exchange, service_yaml, socks5_connect_from, testserver, testserver_ca,
    two_nodes_with, two_workloads_yaml, workload_yaml, Backend, TwoNodes,
};

/// Backends listen on fixed ports below the ephemeral range: an ephemeral backend port could equal
/// one of l4mesh's own (ephemeral) listener ports, which the loop guard refuses on loopback.
const BACKEND_PORT: u16 = 18080;
/// A port nothing listens on.
const CLOSED_PORT: u16 = 18099;

/// Each test has its own addresses (`127.43.<n>.x`), so that their HBONE listeners (all on port
/// 15008) do not collide. Node B also holds `b2` (`127.43.<n>.3`), a workload that is not the
/// one a tunnel to `127.43.<n>.2` was dialled for.
fn state(n: u8) -> String {
    two_workloads_yaml(
        &format!("127.43.{n}.1"),
        &format!("127.43.{n}.2"),
        &endpoint_of_yaml("echo", BACKEND_PORT),
        &format!(
            "{}services:\n{}",
            workload_yaml("b2", "server2", &format!("127.43.{n}.3"), "node-b", ""),
            service_yaml(
                "echo",
                &format!("127.43.{n}.100"),
                BACKEND_PORT,
                "  subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/server\"]\n",
            )
        ),
    )
}

struct Mesh {
    a: l4mesh::app::Running,
    b: l4mesh::app::Running,
    /// A's workload IP (the client's source address).
    a_ip: IpAddr,
    /// B's workload IP (where the backends listen).
    b_wl: String,
    _ts: Handle,
}

async fn mesh(n: u8) -> Mesh {
    mesh_with_ca(n, None).await
}

/// A mesh whose CA is `ca` (plug-in CA material) when given.
async fn mesh_with_ca(n: u8, ca: Option<xds_testserver::CaPem>) -> Mesh {
    mesh_with(n, ca, |_| {}).await
}

/// A mesh whose nodes' configurations `configure` adjusts.
async fn mesh_with(
    n: u8,
    ca: Option<xds_testserver::CaPem>,
    configure: impl FnMut(&mut l4mesh::config::Config),
) -> Mesh {
    let ts = testserver(state(n), "127.0.0.1", ca).await;
    let TwoNodes { a, b, ts } = two_nodes_with(ts, &format!("127.43.{n}"), configure).await;
    Mesh {
        a,
        b,
        a_ip: format!("127.43.{n}.1").parse().unwrap(),
        b_wl: format!("127.43.{n}.2"),
        _ts: ts,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_between_two_nodes_share_one_connection() {
    let m = mesh(1).await;
    let backend = Backend::start(&format!("{}:{BACKEND_PORT}", m.b_wl), "b").await;
    let port = backend.addr.port();

    // Concurrent first requests for one key open one connection.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (socks, a_ip, b_wl) = (m.a.socks5.unwrap(), m.a_ip, m.b_wl.clone());
        tasks.push(tokio::spawn(async move {
            let s = socks5_connect_from(a_ip, socks, &b_wl, port)
                .await
                .expect("tunnel accepted");
            exchange(s, &format!("hello {i}")).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), format!("b:hello {i}"));
    }
    // A later connection reuses it.
    let s = socks5_connect_from(m.a_ip, m.a.socks5.unwrap(), &m.b_wl, port)
        .await
        .unwrap();
    assert_eq!(exchange(s, "again").await, "b:again");
    assert_eq!(m.a.proxy.hbone.outbound_tls_connections(), 1);
    assert_eq!(m.b.proxy.hbone.inbound_tls_connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_both_ways_with_half_close() {
    let m = mesh(2).await;
    let backend = Backend::start(&format!("{}:{BACKEND_PORT}", m.b_wl), "b").await;
    let mut s = socks5_connect_from(m.a_ip, m.a.socks5.unwrap(), &m.b_wl, backend.addr.port())
        .await
        .unwrap();
    let data: Vec<u8> = (0..100 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(31) % 253) as u8)
        .collect();
    let got = tokio::time::timeout(Duration::from_secs(180), async {
        s.write_all(&data).await.unwrap();
        // The backend answers only after it saw our half-close through the tunnel.
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    })
    .await
    .expect("transfer timed out");
    assert_eq!(&got[..2], b"b:");
    assert_eq!(got.len() - 2, data.len());
    assert!(got[2..] == data[..], "bytes crossed intact");
    // Counted as one tunnel each side, with the bytes.
    use std::sync::atomic::Ordering::Relaxed;
    let (ta, tb) = (&m.a.proxy.hbone.tunnels, &m.b.proxy.hbone.tunnels);
    for _ in 0..100 {
        // Tunnels count as opened at their start, their bytes and status at their end.
        if tb.inbound_bytes_received.load(Relaxed) > 0 && ta.outbound_bytes_sent.load(Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ta.outbound_opened.load(Relaxed), 1);
    assert_eq!(ta.outbound_bytes_sent.load(Relaxed), data.len() as u64);
    assert_eq!(tb.inbound_opened.load(Relaxed), 1);
    assert_eq!(
        tb.inbound_bytes_received.load(Relaxed),
        data.len() as u64 + 2
    );
    assert_eq!(tb.status(200).load(Relaxed), 1);
    assert_eq!(tb.status_other.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_is_refused_through_the_tunnel() {
    let m = mesh(3).await;
    // A port on B's workload IP that nothing listens on: B answers 503, A refuses the client.
    let closed = CLOSED_PORT;
    let r = socks5_connect_from(m.a_ip, m.a.socks5.unwrap(), &m.b_wl, closed).await;
    assert!(r.is_err(), "a refused tunnel is refused to the client");
    // The TLS connection itself stays usable.
    let backend = Backend::start(&format!("{}:{BACKEND_PORT}", m.b_wl), "b").await;
    let s = socks5_connect_from(m.a_ip, m.a.socks5.unwrap(), &m.b_wl, backend.addr.port())
        .await
        .unwrap();
    assert_eq!(exchange(s, "ok").await, "b:ok");
    assert_eq!(m.b.proxy.hbone.inbound_tls_connections(), 1);
}

fn id(sa: &str) -> l4mesh::model::SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .unwrap()
}

/// TLS to B's HBONE listener, presenting `client`'s certificate and expecting `server`.
async fn raw_tls(
    m: &Mesh,
    client: &str,
    server: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, std::io::Error> {
    use std::sync::Arc;
    let secrets = l4mesh::identity::SecretManager::new(l4mesh::identity::CaClient::istio(
        testserver_ca(&m._ts),
    ));
    let cert = secrets.fetch(&id(client)).await.unwrap();
    let cfg = l4mesh::tls::client_config(
        l4mesh::tls::ManagedCert::new(secrets.clone(), id(client)),
        cert.roots.clone(),
        vec![id(server)],
        None,
    )
    .unwrap();
    let addr = m.b.hbone;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(Arc::<rustls::ClientConfig>::clone(&cfg))
        .connect(name, tcp)
        .await
}

/// A raw HBONE client to B's listener, presenting `client`'s certificate and expecting `server`.
async fn raw_client(
    m: &Mesh,
    client: &str,
    server: &str,
) -> Result<h2::client::SendRequest<bytes::Bytes>, std::io::Error> {
    let tls = raw_tls(m, client, server).await?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn status_of(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    req: http::Request<()>,
) -> u16 {
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, _stream) = ready.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .unwrap()
        .unwrap();
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refusals() {
    let m = mesh(4).await;
    let mut send = raw_client(&m, "client", "server").await.unwrap();
    let connect = |authority: String| {
        http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(())
            .unwrap()
    };
    // A's workload is not on B's node.
    let a_port = SocketAddr::new(m.a_ip, 80).to_string();
    assert_eq!(status_of(&mut send, connect(a_port)).await, 400);
    // Not a CONNECT.
    let get = http::Request::get(format!("http://{}:80/", m.b_wl))
        .body(())
        .unwrap();
    assert_eq!(status_of(&mut send, get).await, 400);
    // A hostname authority no service has: 503 (and not even a DNS name: 400).
    assert_eq!(
        status_of(&mut send, connect("b.default:80".into())).await,
        503
    );
    assert_eq!(
        status_of(&mut send, connect("b..default:80".into())).await,
        400
    );
    // Nothing listens there: 503.
    let closed = CLOSED_PORT;
    let target = format!("{}:{closed}", m.b_wl);
    assert_eq!(status_of(&mut send, connect(target)).await, 503);
    // Another workload of B's node, on the connection dialled for `b` (whose certificate it
    // presented): 400, even with a backend listening there.
    let _b2 = Backend::start(&format!("127.43.4.3:{BACKEND_PORT}"), "b2").await;
    let other = format!("127.43.4.3:{BACKEND_PORT}");
    assert_eq!(status_of(&mut send, connect(other)).await, 400);
    // B's forwarding ports, whatever address they are bound to (B's listeners are on
    // 127.43.4.12): never a destination.
    let own = [
        m.b.hbone.port(),
        m.b.outbound.port(),
        m.b.inbound_plaintext.port(),
        m.b.socks5.unwrap().port(),
    ];
    for port in own {
        let target = format!("{}:{port}", m.b_wl);
        assert_eq!(
            status_of(&mut send, connect(target.clone())).await,
            400,
            "{target}"
        );
    }

    // The client refuses a server that proves another identity.
    let err = raw_client(&m, "client", "someone-else").await.err();
    assert!(
        err.is_some(),
        "handshake with the wrong server identity fails"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_vip_goes_through_the_tunnel() {
    let m = mesh(5).await;
    let _backend = Backend::start(&format!("{}:{BACKEND_PORT}", m.b_wl), "b").await;
    let vip = "127.43.5.100";
    let s = socks5_connect_from(m.a_ip, m.a.socks5.unwrap(), vip, 80)
        .await
        .unwrap();
    assert_eq!(exchange(s, "via vip").await, "b:via vip");
    assert_eq!(m.b.proxy.hbone.inbound_tls_connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_connection_makes_room_on_a_new_one() {
    let m = mesh(6).await;
    let backend = Backend::start(&format!("{}:{BACKEND_PORT}", m.b_wl), "b").await;
    let port = backend.addr.port();
    // 120 tunnels held open at once: 100 fit on the first connection, the rest on a second.
    let mut open = Vec::new();
    for i in 0..120 {
        let s = socks5_connect_from(m.a_ip, m.a.socks5.unwrap(), &m.b_wl, port)
            .await
            .unwrap_or_else(|rep| panic!("tunnel #{i} refused with SOCKS5 reply {rep}"));
        open.push(s);
    }
    assert_eq!(m.a.proxy.hbone.outbound_tls_connections(), 2);
    let replies = futures_all(
        open.into_iter()
            .enumerate()
            .map(|(i, s)| async move { (i, exchange(s, &format!("n{i}")).await) }),
    )
    .await;
    for (i, reply) in replies {
        assert_eq!(reply, format!("b:n{i}"));
    }
}

async fn futures_all<F: std::future::Future + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A client certificate from the mesh root but another trust domain: the handshake fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_from_another_trust_domain_is_refused() {
    use std::sync::Arc;
    // A CA whose key the test holds, plugged into the testserver, so that it can mint a foreign
    // identity under the same root.
    let (pem, ca) = super::harness::plug_in_root("test mesh root");
    let m = mesh_with_ca(7, Some(pem)).await;
    // A live backend: without it a 503 would also count as "refused", whatever the handshake did.
    let _backend = Backend::start(&format!("{}:{BACKEND_PORT}", m.b_wl), "b").await;
    let foreign: l4mesh::model::SpiffeId = "spiffe://other.domain/ns/default/sa/client"
        .parse()
        .unwrap();
    let cert = Arc::new(ca.issue(&foreign, Duration::from_secs(3600)).unwrap());

    #[derive(Debug)]
    struct Fixed(Arc<l4mesh::identity::WorkloadCert>);
    impl l4mesh::tls::CertSource for Fixed {
        fn current(&self) -> Option<Arc<l4mesh::identity::WorkloadCert>> {
            Some(self.0.clone())
        }
    }
    let cfg = l4mesh::tls::client_config(
        Arc::new(Fixed(cert.clone())),
        ca.roots(),
        vec![id("server")],
        None,
    )
    .unwrap();
    let addr = m.b.hbone;
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    // TLS 1.3: the client may finish its side before the server's refusal arrives; the refusal
    // shows at the latest when HTTP/2 starts.
    let refused = refused_tunnel(cfg, addr, name, &m.b_wl).await;
    assert!(
        refused,
        "a client from another trust domain must not get a tunnel"
    );
    assert_eq!(
        m.b.proxy
            .hbone
            .tunnels
            .inbound_opened
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// Whether a TLS + HTTP/2 + CONNECT attempt with `cfg` fails at any step.
async fn refused_tunnel(
    cfg: std::sync::Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: rustls_pki_types::ServerName<'static>,
    b_wl: &str,
) -> bool {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return true;
    };
    let Ok(tls) = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
    else {
        return true;
    };
    let Ok(Ok((send, conn))) =
        tokio::time::timeout(Duration::from_secs(5), h2::client::handshake(tls)).await
    else {
        return true;
    };
    tokio::spawn(conn);
    let Ok(mut send) = send.ready().await else {
        return true;
    };
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("{b_wl}:{BACKEND_PORT}"))
        .body(())
        .unwrap();
    let Ok((resp, _)) = send.send_request(req, false) else {
        return true;
    };
    !matches!(
        tokio::time::timeout(Duration::from_secs(5), resp).await,
        Ok(Ok(r)) if r.status() == 200
    )
}

/// Issue 14, item 4: the inbound HBONE listener drops a peer that stopped answering PINGs (it
/// vanished without a FIN), and sends a GOAWAY to a connection that carries no tunnel for the
/// idle timeout; a busy connection stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_hbone_drops_dead_peers_and_idle_connections() {
    let m = mesh_with(9, None, |c| {
        c.h2.ping_interval = Duration::from_millis(500);
        c.h2.server_idle_timeout = Duration::from_millis(1500);
    })
    .await;
    // A peer that speaks HTTP/2's preface and SETTINGS, then never answers anything.
    let mut dead = raw_tls(&m, "client", "server").await.unwrap();
    dead.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let took = closed_within(&mut dead, Duration::from_secs(5)).await;
    assert!(
        matches!(took, Some(t) if t >= Duration::from_millis(900) && t < Duration::from_secs(4)),
        "a peer that answers no PING must be dropped after about two intervals: {took:?}"
    );

    // A live peer with no tunnel: GOAWAY at the idle timeout, then the connection ends.
    let tls = raw_tls(&m, "client", "server").await.unwrap();
    let (_send, conn) = h2::client::handshake(tls).await.unwrap();
    let t0 = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "an idle HBONE connection must be closed");
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );

    // A tunnel held open longer than the idle timeout is untouched (the peer answers PINGs).
    let _b = Backend::start(&format!("{}:{BACKEND_PORT}", m.b_wl), "b").await;
    let mut s = socks5_connect_from(m.a_ip, m.a.socks5.unwrap(), &m.b_wl, BACKEND_PORT)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    s.write_all(b"late").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "b:late");
}

/// Issue 14, item 2: in dedicated mode the served workload is `PROXY_WORKLOAD_INFO`'s, whatever
/// `NODE_NAME` says: a ztunnel-style file whose workloads carry `node:` works with no NODE_NAME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_mode_serves_its_workload_without_node_name() {
    let m = mesh_with(10, None, |c| {
        if c.node_name == "node-b" {
            c.node_name = String::new();
            c.workload_info = Some(l4mesh::config::WorkloadInfo {
                namespace: "default".into(),
                name: "b".into(),
                service_account: "server".into(),
            });
        }
    })
    .await;
    let _b = Backend::start(&format!("{}:{BACKEND_PORT}", m.b_wl), "b").await;
    let s = socks5_connect_from(m.a_ip, m.a.socks5.unwrap(), &m.b_wl, BACKEND_PORT)
        .await
        .unwrap();
    assert_eq!(exchange(s, "no-node").await, "b:no-node");
}

/// Issue 14, item 8: a dual-stack listener reports an IPv4 client as `::ffff:a.b.c.d`; l4mesh
/// canonicalises it at accept, so the client is found as the workload at `a.b.c.d` (and tunnels
/// with its identity) instead of being an unknown source with no identity to tunnel from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_clients_of_a_dual_stack_listener_are_their_workloads() {
    let m = mesh_with(11, None, |c| {
        if c.node_name == "node-a" {
            c.socks5_addr = Some("[::]:0".parse().unwrap());
        }
    })
    .await;
    let _b = Backend::start(&format!("{}:{BACKEND_PORT}", m.b_wl), "b").await;
    let port = m.a.socks5.unwrap().port();
    let socks = SocketAddr::new("127.43.11.11".parse().unwrap(), port);
    let s = socks5_connect_from(m.a_ip, socks, &m.b_wl, BACKEND_PORT)
        .await
        .unwrap();
    assert_eq!(exchange(s, "mapped").await, "b:mapped");
}

/// A CONNECT naming a service by hostname (ztunnel's `SvcHostname`, sent through network
/// gateways) goes to the workload the tunnel was dialled on, on the port the service maps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_hostname_is_delivered_to_the_dialled_workload() {
    let n = 9;
    let ts = testserver(state(n), "127.0.0.1", None).await;
    let b_wl = format!("127.43.{n}.2");
    // B's HBONE listener on b's own address, as in a pod: the tunnel is dialled on b.
    let _b = super::harness::mesh_node(&ts, &b_wl, "node-b", &b_wl).await;
    let _backend = Backend::start(&format!("{b_wl}:{BACKEND_PORT}"), "b").await;
    let hbone: SocketAddr = format!("{b_wl}:15008").parse().unwrap();
    let raw = || async {
        let tcp = tokio::net::TcpStream::connect(hbone).await.unwrap();
        super::raw_hbone::client(testserver_ca(&ts), "client", tcp).await
    };
    let (resp, mut send) =
        super::raw_hbone::connect(raw().await, "Echo.default.svc.cluster.local:80".into()).await;
    assert_eq!(resp.status(), 200);
    send.send_data(bytes::Bytes::from_static(b"by name"), true)
        .unwrap();
    let got = super::raw_hbone::read_to_end(resp).await;
    assert_eq!(String::from_utf8(got).unwrap(), "b:by name");
    // A port the service does not have, a hostname no service has: 503.
    for authority in [
        "echo.default.svc.cluster.local:81",
        "nope.default.svc.cluster.local:80",
    ] {
        assert_eq!(
            super::raw_hbone::status(raw().await, authority.into()).await,
            503,
            "{authority}"
        );
    }
}

/// Tunnels waiting on one pooled connection that fails under them all at once (a draining peer's
/// GOAWAY, a peer gone) retry on one new connection between them, not on one each in turn
/// behind the pool's lock (which outlasted the connect timeout during upgrades under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_failed_together_retry_on_one_new_connection() {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::sync::Arc;
    const WAITING: usize = 30;
    let n = 12;
    let ts = testserver(state(n), "127.0.0.1", None).await;
    let (a_ip, b_wl) = (format!("127.43.{n}.1"), format!("127.43.{n}.2"));
    let a = super::harness::mesh_node(&ts, format!("127.43.{n}.11"), "node-a", &a_ip).await;
    // A stand-in for B's HBONE listener, with B's certificate: its first connection takes every
    // CONNECT without answering, then drops them all at once; later ones answer 200.
    let secrets =
        l4mesh::identity::SecretManager::new(l4mesh::identity::CaClient::istio(testserver_ca(&ts)));
    let cert = secrets.fetch(&id("server")).await.unwrap();
    let resolver = l4mesh::tls::SourceResolver::new(l4mesh::tls::ManagedCert::new(
        secrets.clone(),
        id("server"),
    ));
    let cfg = l4mesh::tls::server_config(
        Arc::new(resolver),
        cert.roots.clone(),
        "cluster.local",
        None,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind(format!("{b_wl}:15008"))
        .await
        .unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let first = count.fetch_add(1, Relaxed) == 0;
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let mut conn = h2::server::handshake(tls).await.unwrap();
                let (mut held, mut streams) = (Vec::new(), Vec::new());
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if first {
                        held.push(respond);
                        if held.len() == WAITING {
                            // Every waiting tunnel fails together.
                            return;
                        }
                    } else {
                        let send = respond
                            .send_response(http::Response::new(()), false)
                            .unwrap();
                        streams.push(send);
                    }
                }
            });
        }
    });
    let socks = a.socks5.unwrap();
    let tunnels: Vec<_> = (0..WAITING)
        .map(|_| {
            let (a_ip, b_wl) = (a_ip.parse().unwrap(), b_wl.clone());
            tokio::spawn(async move { socks5_connect_from(a_ip, socks, &b_wl, BACKEND_PORT).await })
        })
        .collect();
    for t in tunnels {
        let r = tokio::time::timeout(Duration::from_secs(20), t).await;
        assert!(
            matches!(r, Ok(Ok(Ok(_)))),
            "every tunnel is accepted on the retry"
        );
    }
    assert_eq!(
        accepted.load(Relaxed),
        2,
        "the failed connection, then one new connection shared by every retry"
    );
}
