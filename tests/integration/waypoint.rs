//! Waypoints across three in-process l4mesh instances following one xds-testserver: A (the
//! client's node), W (the waypoint's node) and B (a node whose workload has a waypoint).
//!
//! l4mesh's inbound HBONE only forwards to workloads of its own node, so the "waypoint" here is an
//! l4mesh whose node also runs the destination workload `d` (whose waypoint is the workload `w` of
//! that node): A must send the tunnel to `w`, with `d`'s `ip:port` as the authority, and W forwards
//! it. A real waypoint (Envoy) would route the authority anywhere; that path is Envoy's, not ours.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use xds_testserver::{Handle, StateSource};

use super::harness::{exchange, mesh_node as node, socks5_connect_from, testserver_ca, Backend};

/// Below the ephemeral range, like hbone.rs (an ephemeral port could equal an l4mesh listener's).
const BACKEND_PORT: u16 = 18080;

/// Addresses `127.47.<n>.x`: a (client, node-a), b (node-b, waypoint w), w (the waypoint,
/// node-w), d (node-w, waypoint w); the service `plain` (no waypoint) has endpoint b.
fn state(n: u8) -> String {
    format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/default/a
  name: a
  namespace: default
  serviceAccount: client
  workloadIps: ["127.47.{n}.1"]
  protocol: HBONE
  node: node-a
- uid: cluster1//v1/Pod/default/b
  name: b
  namespace: default
  serviceAccount: server
  workloadIps: ["127.47.{n}.2"]
  protocol: HBONE
  node: node-b
  waypoint: {{ destination: "/127.47.{n}.3", hboneMtlsPort: 15008 }}
  services:
    "default/plain.default.svc.cluster.local": {{ 80: {BACKEND_PORT} }}
- uid: cluster1//v1/Pod/default/w
  name: w
  namespace: default
  serviceAccount: waypoint
  workloadIps: ["127.47.{n}.3"]
  protocol: HBONE
  node: node-w
- uid: cluster1//v1/Pod/default/d
  name: d
  namespace: default
  serviceAccount: server
  workloadIps: ["127.47.{n}.4"]
  protocol: HBONE
  node: node-w
  waypoint: {{ destination: "/127.47.{n}.3", hboneMtlsPort: 15008 }}
services:
- name: plain
  namespace: default
  hostname: plain.default.svc.cluster.local
  vips: ["/127.47.{n}.100"]
  ports: {{ 80: {BACKEND_PORT} }}
"#
    )
}

struct Mesh {
    a: l4mesh::app::Running,
    b: l4mesh::app::Running,
    w: l4mesh::app::Running,
    n: u8,
    ts: Handle,
}

impl Mesh {
    fn ip(&self, last: u8) -> String {
        format!("127.47.{}.{last}", self.n)
    }

    fn a_ip(&self) -> IpAddr {
        self.ip(1).parse().unwrap()
    }
}

async fn mesh(n: u8) -> Mesh {
    l4mesh::telemetry::init(l4mesh::telemetry::LogFormat::Plain);
    let mut c = xds_testserver::Config::new(StateSource::Yaml(state(n)));
    c.listen = "127.0.0.1:0".parse().unwrap();
    let ts = Handle::start(c).await.unwrap();
    let ip = |last: u8| format!("127.47.{n}.{last}");
    let a = node(&ts, ip(11), "node-a", ip(1)).await;
    let b = node(&ts, ip(12), "node-b", ip(2)).await;
    let w = node(&ts, ip(13), "node-w", ip(3)).await;
    Mesh { a, b, w, n, ts }
}

fn id(sa: &str) -> l4mesh::model::SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .unwrap()
}

/// The status B answers to a CONNECT for `authority`, from a raw HBONE client presenting
/// `client`'s certificate.
async fn raw_connect(m: &Mesh, client: &str, authority: String) -> u16 {
    let secrets = l4mesh::identity::SecretManager::new(l4mesh::identity::CaClient::Istio(
        testserver_ca(&m.ts),
    ));
    let cert = secrets.fetch(&id(client)).await.unwrap();
    let cfg = l4mesh::tls::client_config(
        l4mesh::tls::ManagedCert::new(secrets.clone(), id(client)),
        cert.roots.clone(),
        vec![id("server")],
    )
    .unwrap();
    let addr = m.b.hbone;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::<rustls::ClientConfig>::clone(&cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap();
    let mut ready = send.ready().await.unwrap();
    let (resp, _stream) = ready.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .unwrap()
        .unwrap();
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_with_a_waypoint_is_reached_through_it() {
    let m = mesh(1).await;
    let _d = Backend::start(&format!("{}:{BACKEND_PORT}", m.ip(4)), "d").await;
    let s = socks5_connect_from(m.a_ip(), m.a.socks5.unwrap(), &m.ip(4), BACKEND_PORT)
        .await
        .expect("tunnel through the waypoint accepted");
    assert_eq!(exchange(s, "via waypoint").await, "d:via waypoint");
    // The tunnel went to the waypoint's node (TLS with w's identity), not to d's address.
    assert_eq!(m.w.proxy.hbone.inbound_tls_connections(), 1);
    assert_eq!(m.a.proxy.hbone.outbound_tls_connections(), 1);
    assert_eq!(m.b.proxy.hbone.inbound_tls_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_with_a_waypoint_refuses_direct_tunnels() {
    let m = mesh(2).await;
    let _b = Backend::start(&format!("{}:{BACKEND_PORT}", m.ip(2)), "b").await;
    let target = format!("{}:{BACKEND_PORT}", m.ip(2));
    // Straight from the client's identity: 401 (the waypoint's policy would be bypassed).
    assert_eq!(raw_connect(&m, "client", target.clone()).await, 401);
    // From the waypoint's identity: accepted.
    assert_eq!(raw_connect(&m, "waypoint", target).await, 200);
    // Through A: the service `plain` has no waypoint, so A picks endpoint b and tunnels to B
    // directly; B refuses, and so the client's connection is refused.
    let r = socks5_connect_from(m.a_ip(), m.a.socks5.unwrap(), &m.ip(100), 80).await;
    assert!(
        r.is_err(),
        "B refuses a direct tunnel for a workload with a waypoint"
    );
    assert!(m.b.proxy.hbone.inbound_tls_connections() >= 3);
}
